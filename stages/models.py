"""Detection networks by name: GluonCV's model zoo SSDs plus the project's own small demo SSD.

Every entry returns a ``gluoncv.model_zoo.ssd.SSD`` so the convert/quantize/evaluate stages can
treat them alike. Unknown names fail with the list of known ones.
"""
from __future__ import annotations

from typing import Callable, Sequence

from stages.common import StageError


def _zoo(zoo_name: str) -> Callable[..., object]:
    """Factory for a GluonCV zoo SSD; ``classes`` re-targets its class predictors if they differ."""

    def build(classes: Sequence[str] | None = None, pretrained: bool = False,
              pretrained_base: bool = False):
        from gluoncv import model_zoo

        net = model_zoo.get_model(zoo_name, pretrained=pretrained,
                                  pretrained_base=pretrained_base)
        if classes is not None and list(classes) != list(net.classes):
            net.reset_class(list(classes))
        return net

    return build


NETWORKS: dict[str, Callable[..., object]] = {
    "ssd_300_vgg16_atrous_coco": _zoo("ssd_300_vgg16_atrous_coco"),
    "ssd_300_vgg16_atrous_voc": _zoo("ssd_300_vgg16_atrous_voc"),
}


def build_network(name: str, **kwargs):
    """Build the network registered as ``name`` (see NETWORKS)."""
    try:
        factory = NETWORKS[name]
    except KeyError:
        raise StageError(f"unknown network {name!r}; known: {', '.join(sorted(NETWORKS))}") from None
    return factory(**kwargs)
