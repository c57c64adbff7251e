import pytest
import torch

torch.set_grad_enabled(False)

@pytest.fixture
def tokens():
    def make(batch, n, vocab=1000, seed=0):
        return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))

    return make
