"""Training methods, one module each, registered by name in :data:`METHODS`.

Importing this package registers all of them. Each method is a ``torch.nn.Module``
whose ``forward(x, organ, label)`` returns ``(loss, logs)``; its losses are pure
functions in the same module, unit-tested on their own.
"""

from medret.methods import clshash, default, dml, dnhn, momentum, selfsup  # noqa: F401  (register)
from medret.methods.base import METHODS, Method, TaskInfo

__all__ = ["METHODS", "Method", "TaskInfo"]
