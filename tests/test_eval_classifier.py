"""The offline MNIST quality metric: a digit classifier that separates real digits from noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.mnist_classifier import get_classifier, load_digits, to_input

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier_cache(request):
    """Trained once per checkout (pytest's cache dir), keyed by the data hash like the user-level cache."""
    return request.config.cache.mkdir("ditstack_digit_classifier")


def test_classifier_separates_real_digits_from_noise(classifier_cache):
    clf = get_classifier(cache_dir=classifier_cache)
    assert clf.info["heldout_accuracy"] >= 0.98 and clf.info["heldout_count"] == 500

    images, labels, _ = load_digits()
    held = torch.arange(len(images)) % 10 == 0  # the digits the classifier never trained on
    real = clf.metrics(images[held], labels[held])
    assert real["digits_accuracy"] >= 0.98

    # real digits, resized and as RGB (what a 32 px RGB generator would produce) still score high
    big = torch.nn.functional.interpolate(images[held].float(), size=(32, 32), mode="bilinear").round()
    rgb = big.clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    assert clf.metrics(rgb, labels[held])["digits_accuracy"] >= 0.95

    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=g)
    fake = clf.metrics(noise, torch.arange(500) % 10)
    assert fake["digits_accuracy"] <= 0.2  # chance is 0.1
    assert fake["digits_fd"] > 20 * max(real["digits_fd"], 1e-3)

    # wrong conditioning labels are caught too
    wrong = clf.metrics(images[held], (labels[held] + 1) % 10)
    assert wrong["digits_accuracy"] <= 0.05

    again = get_classifier(cache_dir=classifier_cache)  # from the cache: same weights, same numbers
    assert again.info == clf.info
    np.testing.assert_allclose(again.metrics(images[held], labels[held])["digits_fd"], real["digits_fd"], rtol=1e-5)


def test_input_conversion():
    x = torch.zeros(2, 3, 56, 56, dtype=torch.uint8)
    x[:, :, :28] = 255
    y = to_input(x)
    assert y.shape == (2, 1, 28, 28) and y[:, :, :13].min() == 1.0 and y[:, :, 15:].max() == 0.0
    with pytest.raises(ValueError, match="uint8"):
        to_input(x.float())
