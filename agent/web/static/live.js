// Live updates for Parley's web faces, with no inline script and no third-party code (the CSP allows neither).
// Listens to the server-sent events at <body data-live="URL"> and, for an event named N:
//   - elements with data-live-text="N" get the event's data as their text;
//   - if an element has data-live-section="N", the page is re-read and every element with data-live-section
//     and an id is swapped for its fresh copy, so the server renders every fragment and this file builds no HTML;
//   - the event "reload" reloads the page (the server dropped events this tab was too slow to take).
"use strict";
(function () {
  const url = document.body.dataset.live;
  if (!url || !window.EventSource) return;
  const source = new EventSource(url);
  const listened = new Set();
  let refreshing = null;
  let refreshAgain = false;

  async function refreshSections() {  // swaps every live section: the fresh page is all current anyway
    if (refreshing) { refreshAgain = true; return; }  // one re-read at a time; a burst of events costs two
    refreshing = fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
    try {
      const response = await refreshing;
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const old of document.querySelectorAll("[data-live-section][id]")) {
        const replacement = fresh.getElementById(old.id);
        if (replacement) old.replaceWith(document.importNode(replacement, true));
      }
      listenToPage();
    } finally {
      refreshing = null;
      if (refreshAgain) { refreshAgain = false; refreshSections(); }
    }
  }

  function listen(name) {
    if (!name || listened.has(name)) return;
    listened.add(name);
    source.addEventListener(name, (event) => {
      for (const element of document.querySelectorAll(`[data-live-text~="${name}"]`)) {
        element.textContent = event.data;
      }
      if (document.querySelector(`[data-live-section~="${name}"]`)) refreshSections();
    });
  }

  function listenToPage() {
    for (const element of document.querySelectorAll("[data-live-text], [data-live-section]")) {
      const names = `${element.dataset.liveText || ""} ${element.dataset.liveSection || ""}`;
      for (const name of names.split(/\s+/)) listen(name);
    }
  }

  listenToPage();
  source.addEventListener("reload", () => window.location.reload());
})();
