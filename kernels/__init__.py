"""Triton kernels of regap_fast, installed as ``regap_fast.kernels`` (see setup.py and README.md here).

This folder is a package only under that name. Run from a checkout's root (pytest's rootdir, ``python -c``,
a REPL), the folder would also be found as a top-level ``kernels`` and shadow the PyPI distribution of
that name (which transformers >= 5.25 imports). So, imported as anything but ``regap_fast.kernels``, this
file hands the name over to the installed ``kernels`` (the import system returns whatever
``sys.modules`` holds once the module has run); when none is installed, to an empty namespace package
(no ``__file__``, nothing in it), which is what transformers' availability check reads as "not installed".
"""

if __name__ != "regap_fast.kernels":
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    def _installed_spec(name: str, checkout_root: str):
        # every sys.path entry but the checkout's root (and "" when that is the working directory)
        here = _os.path.realpath(checkout_root)
        path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != here]
        return _PathFinder.find_spec(name, path)

    _spec = _installed_spec(__name__, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    if _spec is None:  # nothing installed: an empty namespace, not this folder's modules
        from importlib.machinery import ModuleSpec as _ModuleSpec

        _spec = _ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # before it runs: its own `import kernels.x` must find it
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
