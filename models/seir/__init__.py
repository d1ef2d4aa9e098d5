from .model import MODEL, SEIRParams, SEIRState

__all__ = ["MODEL", "SEIRParams", "SEIRState"]
