"""ainode's network node: settings, receiver, store, index, assembler, router, jobs, dispatcher, api, cli."""

__version__ = "0.1.0"
