import os
import sys
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download: any attempt fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download something")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small copy of the embedded dataset: 6 classes, 24 train / 8 val images per class."""
    from data.embedded import generate
    root = str(tmp_path_factory.mktemp("data") / "embedded")
    generate(root, seed=0, splits={"train": 24, "val": 8}, per_pair=1)
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A random nano/4 project checkpoint (32 px, patch 4), used as an MD teacher."""
    from data.embedded import CLASSES
    from model import ViT, ViTConfig
    torch.manual_seed(123)
    cfg = ViTConfig.from_name("nano/4", num_classes=6)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    checkpoint = dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict(), config={}, classes=sorted(CLASSES))
    torch.save(checkpoint, path)
    return path
