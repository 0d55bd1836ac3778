"""A placeholder for torchvision, for the integration tests only.

timm imports torchvision at module level (``torchvision.ops.misc.FrozenBatchNorm2d``, the
transforms of ``timm.data``) but builds its models (resnet18, vit, mobilenetv3) without it.
The torchvision wheels the package index serves are CUDA builds whose import fails beside CPU
torch (``operator torchvision::nms does not exist``), so where torchvision cannot be imported
this finder answers every ``torchvision.*`` import with an empty module whose attributes are
placeholder classes (distinct per name; instantiating one raises). :func:`install` puts it in
front of ``sys.meta_path``; nothing in kfac_fast imports torchvision.
"""
import importlib.abc
import importlib.machinery
import sys
import types

class _AnyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _AnyMeta(name, (cls,), {})  # a distinct placeholder per attribute (dict keys stay apart)
        setattr(cls, name, sub)
        return sub
    def __iter__(cls):
        return iter(())

class _Any(metaclass=_AnyMeta):
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision is not installed (a placeholder module stands in for it)")

class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _AnyMeta(name, (_Any,), {})
        setattr(self, name, sub)
        return sub

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _Module(spec.name); m.__path__ = []; m.__version__ = "0.0"; return m
    def exec_module(self, module):
        pass



def install() -> bool:
    """Stand in for torchvision unless the real one imports; True when the placeholder is used."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True
