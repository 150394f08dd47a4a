"""Fault tests with real processes on loopback: the real entry points, killed, cut off and restarted."""
