"""benchmarks/common.py: the shapes the speed and scale benchmarks run at."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_nano_parent_of_issue_14_has_nanos_size():
    """benchmarks/common.NANO_LAYERS with Nano's widths is the 31.6B parent (3.2B active) issue 14 runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from common import NANO_LAYERS, active_params, nano_config
    from star_elastic.model import Model

    cfg = nano_config()
    assert cfg.layer_types == NANO_LAYERS and [NANO_LAYERS.count(k) for k in "ME*"] == [23, 23, 6]
    with torch.device("meta"):
        model = Model(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 31.58) < 0.01
    assert abs(active_params(cfg, model) / 1e9 - 3.23) < 0.01
