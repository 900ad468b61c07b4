"""KFP components: thin ``@dsl.component`` wrappers, one per stage, each calling one library function.

Every component runs in the one image below (built from ``components/Dockerfile``),
which already holds lorafleet and kfp: no component installs packages at run time.
"""

from kfp import dsl

__all__ = ["IMAGE", "fleet_component"]

# The one image for all components; bump with the package version.
IMAGE = "ghcr.io/lorafleet/lorafleet:0.1.0"


def fleet_component(func):
    """``@dsl.component`` on the fleet image, with nothing installed at run time."""
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)
