"""Serving: one base per replica, adapters multiplexed onto it, an OpenAI-compatible ingress."""

__all__ = ["AppArgs", "build_app"]


def __getattr__(name: str):  # keep `import lorafleet.serve` light: Ray Serve loads on use
    if name == "build_app":
        from lorafleet.serve.app import build_app

        return build_app
    if name == "AppArgs":
        from lorafleet.serve.config import AppArgs

        return AppArgs
    raise AttributeError(name)
