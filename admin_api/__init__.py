"""The admin REST API of a site: ``create_app(services)`` and the uvicorn runner."""
