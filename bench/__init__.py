"""Benchmarks: each module measures our code next to a real peer in the same run."""
