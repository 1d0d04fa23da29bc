"""Feature extractors: Inception plumbing (random weights, no download) and the digit classifier."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ddpm.eval.classifier import DigitClassifier, class_histogram, train_classifier
from ddpm.eval.features import (
    INCEPTION_WEIGHTS_URL,
    FeatureExtractor,
    InceptionV3Features,
    check_images,
    resize_bilinear_tf1,
    weights_fingerprint,
)
from ddpm.eval.metrics import frechet_distance_from_features, kid


@contextlib.contextmanager
def one_thread():
    # The nets here are tiny; intra-op threads only add overhead (a lot of it on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# Inception-v3 plumbing
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception():
    # batch_size=1 so that two images already exercise the chunking
    return InceptionV3Features(pretrained=False, seed=0, batch_size=1)


def test_inception_architecture(random_inception):
    # The FID graph without its auxiliary head: torchvision's 23,834,568 parameters for 1000 classes
    # plus the 8 extra classes of the 2015 graph (8 * 2048 weights + 8 biases).
    assert sum(p.numel() for p in random_inception.net.parameters()) == 23_834_568 + 8 * 2049
    assert isinstance(random_inception, FeatureExtractor)
    assert random_inception.dim == 2048


def test_inception_features_shape_and_consistency(random_inception):
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = random_inception(grey)  # two chunks of one image, each resized to 299x299
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and feats.std() > 0
    assert not torch.allclose(feats[0], feats[1])
    # grey is repeated to three channels before the resize
    prepared = random_inception._prepare(grey)
    torch.testing.assert_close(prepared, resize_bilinear_tf1(grey.expand(-1, 3, -1, -1), 299))
    assert prepared.shape == (2, 3, 299, 299)


def test_inception_weights_round_trip(random_inception, tmp_path):
    state = dict(random_inception.net.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["AuxLogits.fc.weight"] = torch.zeros(3)  # ignored: does not affect pool features
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = InceptionV3Features(path, resize="pytorch")
    assert loaded.fingerprint == random_inception.fingerprint  # the same weights, buffers included
    assert loaded.name == "inception-v3-fid-pool3"
    x = torch.rand(1, 3, 96, 96) * 2 - 1  # the bare network runs on small inputs too: cheap check
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), random_inception.net(x))

    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="fc.bias"):
        InceptionV3Features(path)


def test_inception_missing_weights_says_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        InceptionV3Features(tmp_path / "nope.pth")
    assert INCEPTION_WEIGHTS_URL in str(info.value) and "nope.pth" in str(info.value)
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        InceptionV3Features()


def test_inception_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resize"):
        InceptionV3Features(pretrained=False, resize="nearest")
    with pytest.raises(ValueError, match="pretrained=False"):
        InceptionV3Features("w.pth", pretrained=False)


def test_resize_bilinear_tf1():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # TF1 samples output pixel o at o * in / out and repeats the edge: 0, 0.5, 1, 1 along each axis.
    expected = torch.tensor(
        [[0.0, 0.5, 1.0, 1.0], [1.0, 1.5, 2.0, 2.0], [2.0, 2.5, 3.0, 3.0], [2.0, 2.5, 3.0, 3.0]]
    )
    torch.testing.assert_close(resize_bilinear_tf1(x, 4)[0, 0], expected)
    y = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(resize_bilinear_tf1(y, 7), y)


def test_check_images_and_fingerprint():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_images(torch.full((1, 1, 4, 4), 255.0))
    with pytest.raises(ValueError, match="channels"):
        check_images(torch.zeros(1, 2, 4, 4), channels=(1, 3))
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_fingerprint(a) == weights_fingerprint(a) != weights_fingerprint(b)


# --------------------------------------------------------------------------------------------------
# Digit classifier on the 8x8 digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    images = torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float32)[:, None]  # 0..16 -> [-1, 1]
    labels = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held_out = perm[:1200], perm[1200:]
    return images[train], labels[train], images[held_out], labels[held_out]


@pytest.fixture(scope="module")
def classifier(digits):
    x, y, _, _ = digits
    with one_thread():
        return train_classifier(x, y, epochs=4, seed=0)


def test_classifier_accuracy_and_outputs(classifier, digits):
    _, _, x_test, y_test = digits
    with one_thread():
        assert classifier.accuracy(x_test, y_test) > 0.95  # 0.99+ when measured
        feats = classifier.features(x_test[:10])
        assert classifier.predict(x_test[:10]).shape == (10,)
    assert feats.shape == (10, classifier.dim) and feats.dtype == torch.float64
    assert isinstance(classifier, FeatureExtractor)
    assert classifier.name == "digit-classifier-8x8-f128"
    with pytest.raises(ValueError, match="8x8"):
        classifier(torch.zeros(1, 1, 28, 28))


def test_classifier_save_load_round_trip(classifier, digits, tmp_path):
    classifier.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [
        "classifier.json",
        "classifier.safetensors",
    ]
    loaded = DigitClassifier.load(tmp_path / "clf")
    assert loaded.fingerprint == classifier.fingerprint
    assert loaded.config == classifier.config and loaded.info == classifier.info
    x = digits[2][:20]
    torch.testing.assert_close(loaded.features(x), classifier.features(x))


def test_classifier_training_is_deterministic(digits):
    x, y, _, _ = digits
    state = torch.get_rng_state()
    with one_thread():
        a = train_classifier(x[:128], y[:128], epochs=1, seed=3, width=8, feature_dim=16)
        b = train_classifier(x[:128], y[:128], epochs=1, seed=3, width=8, feature_dim=16)
        c = train_classifier(x[:128], y[:128], epochs=1, seed=4, width=8, feature_dim=16)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


def test_class_histogram():
    hist = class_histogram(torch.tensor([0, 2, 2, 3]), 4)
    torch.testing.assert_close(hist, torch.tensor([0.25, 0.0, 0.5, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="predictions"):
        class_histogram(torch.tensor([4]), 4)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-1.0, 2.0)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(k1, k1) / k1.sum() ** 2
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k[None, None])


def test_frechet_distance_orders_sample_quality(classifier, digits):
    """Held-out real digits are close to the training digits, blurred ones further, noise furthest."""
    x_train, _, x_test, y_test = digits
    gen = torch.Generator().manual_seed(1)
    noise = (torch.randn(x_test.shape, generator=gen) * 0.5).clamp(-1, 1)
    with one_thread():
        ref = classifier(x_train)
        sets = {"real": x_test, "blurred": blur(x_test, sigma=0.5), "noise": noise}
        fd = {name: frechet_distance_from_features(ref, classifier(imgs)) for name, imgs in sets.items()}
        kid_real = kid(ref, classifier(x_test), num_subsets=5, subset_size=100)
        kid_noise = kid(ref, classifier(noise), num_subsets=5, subset_size=100)
        hist = class_histogram(classifier.predict(x_test), 10)
    # measured (seed 0): real 0.76, blurred 31, noise 183
    assert fd["real"] < 0.1 * fd["blurred"]
    assert fd["blurred"] < 0.5 * fd["noise"]
    assert abs(kid_real[0]) < kid_noise[0]
    torch.testing.assert_close(hist, class_histogram(y_test, 10), atol=0.02, rtol=0)
