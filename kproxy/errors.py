"""The exceptions kproxy raises for bad input and failed operations."""


class KproxyError(Exception):
    """Base class: a message fit to show a user as it is."""


class ConfigError(KproxyError):
    """A cluster setting that cannot work (bad CIDR, overlap, name too long...)."""


class NotFound(KproxyError):
    """A cluster, node or pod that does not exist."""


class KernelError(KproxyError):
    """The kernel refused something kproxy asked of it."""
