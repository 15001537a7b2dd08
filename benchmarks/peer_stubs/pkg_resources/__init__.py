"""`get_distribution(name).version`, all that `dalle_pytorch/__init__.py` asks of pkg_resources."""

from importlib.metadata import version


class _Distribution:
    def __init__(self, name: str):
        self.version = version(name)


def get_distribution(name: str) -> _Distribution:
    return _Distribution(name)
