"""Routing over a patch library: the library directory (library.py), the routed model that runs only the chosen
experts (routed.py), Phatgoose gates (gates.py), GLIDER's global instruction router (glider.py), Arrow through
PEFT (arrow.py), and evaluation on a mixed-task stream with the baselines (evaluate.py); knobs in config.py."""

from patchlm.route.config import ROUTERS, RouteConfig
from patchlm.route.library import Expert, Library, read_examples

__all__ = ["ROUTERS", "Expert", "Library", "RouteConfig", "read_examples"]
