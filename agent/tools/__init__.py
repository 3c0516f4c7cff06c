"""Tools built on the library, never imported by it: demo, bench, chaos, fuzz, certificates, key generation,
bundle verification, the test vectors' command and a throwaway PostgreSQL."""
