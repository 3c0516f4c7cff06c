"""The web kit both faces share (the household's space, the biller's console): see docs/WEB.md.

An aiohttp app opened by a token on loopback, CSRF on every post, strict security headers, Jinja2 templates and
static files from the wheel (`templates/`, `static/`), server-sent events for live pages, SVG charts drawn on
the server, and `start_site` to serve it.
"""

from agent.web.app import SECURITY_HEADERS, WEB_CONFIG, WebConfig, create_web_app, forbidden, render, static_url
from agent.web.charts import Bar, Marker, StepState, TimelineStep, bar_chart, day_label, line_chart, timeline
from agent.web.security import CSRF_FIELD, CSRF_HEADER, check_listen_address, is_loopback_host, new_token
from agent.web.site import RunningSite, server_ssl_context, start_site
from agent.web.sse import RELOAD_EVENT, EventHub, ServerSentEvent, Subscription, stream_events

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "RELOAD_EVENT",
    "SECURITY_HEADERS",
    "WEB_CONFIG",
    "Bar",
    "EventHub",
    "Marker",
    "RunningSite",
    "ServerSentEvent",
    "StepState",
    "Subscription",
    "TimelineStep",
    "WebConfig",
    "bar_chart",
    "check_listen_address",
    "create_web_app",
    "day_label",
    "forbidden",
    "is_loopback_host",
    "line_chart",
    "new_token",
    "render",
    "server_ssl_context",
    "start_site",
    "static_url",
    "stream_events",
    "timeline",
]
