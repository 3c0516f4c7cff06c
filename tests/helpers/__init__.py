"""Test helpers for the biller agent: a signed test consumer and a database inspector."""
