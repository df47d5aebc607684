"""Shared pytest configuration for the tvix test suite."""
