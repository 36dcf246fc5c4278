"""Shared fixtures. Each support module is a pytest plugin owning its own fixtures."""

pytest_plugins = [
    "tests.support.redis_server",
    "tests.support.phone",
    "tests.support.sipp",
    "tests.support.site",
    "tests.support.deployment",
]
