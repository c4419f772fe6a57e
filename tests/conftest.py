import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand_features(*shape, dtype=torch.float64):
    """Positive features, like every registered map produces."""
    return torch.rand(*shape, dtype=dtype) + 0.05
