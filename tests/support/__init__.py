"""What the tests and the benchmarks share: the real server on a free loopback port, a throwaway PostgreSQL
cluster, readings of /proc, an HTTP client for the API, and wrk's load."""
