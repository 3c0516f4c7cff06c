"""Tools built on the library, never imported by it: demo, bench, chaos, fuzz, certificates, a throwaway PostgreSQL."""
