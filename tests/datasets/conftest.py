"""The toy corpus fixture shared by the loader, reader and order tests."""

import pytest
import torch

from tests.datasets.toy_corpus import make_corpus

torch.set_num_threads(1)


@pytest.fixture
def corpus(tmp_path):
    out = str(tmp_path / "corpus")
    return out, make_corpus(out)
