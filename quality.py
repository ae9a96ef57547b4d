"""How good the samples are, measured as the papers measure it: FID, KID and Inception Score through torch-fidelity,
and for the 8x8 digits the same distances in the feature space of a small digit classifier, since Inception sees an
8x8 digit only as a blur at 299 x 299.

    FID [Heusel et al. 2017]     |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)): the Frechet distance between
                                 the Gaussians fitted to the features of two sets (Inception's 2048 pool features);
    KID [Binkowski et al. 2018]  the unbiased MMD^2 with the cubic kernel k(a, b) = (a.b / d + 1)^3, averaged over
                                 random subsets of both sets: unbiased, so 0 in expectation for two sets from one law;
    IS [Salimans et al. 2016]    exp E_x KL(p(y | x) || p(y)) of Inception's classifier, for 3-channel images only.

The papers' protocol (NCSN: IS 8.87, FID 25.32; NCSNv2: FID 10.87, CIFAR-10): 50,000 samples against the 50,000
training images, with TensorFlow's Inception, which torch-fidelity's "inception-v3-compat" reproduces. FID is biased
upwards at small counts (on about 1,000 samples NCSNv2's own fast_fid reads about 39 where 50,000 read about 11), so a
number at another count compares only with numbers at that same count. KID has no such bias.

Beside the distances, two checks that need no feature space: samples of the best Gaussian fitted to the training
images (what any model must beat), and each sample's distance to its nearest training image (a model that copies its
training set would score well on FID and be worthless).
"""
import contextlib
import hashlib
import os
import sys

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

INCEPTION = "inception-v3-compat"  # torch-fidelity's port of TensorFlow's 2015-12-05 Inception (the papers' FID)
DIGITS = "digits-classifier"  # DigitFeatures below, registered with torch-fidelity


class QualityError(Exception):
    """A one-line message for the user: weights that cannot be found, sets too small to compare."""


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


# ---- Inception's weights ---------------------------------------------------------------------------------------

def inception_weights(path=None, progress=True):
    """The file of torch-fidelity's Inception weights: `path` when given, else the copy in torch.hub's cache
    (<torch hub dir>/checkpoints), downloaded there on first use."""
    if path is not None:
        if not os.path.isfile(path):
            raise QualityError(f"--fid-weights {path} is not a file")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:  # to a temporary name, then renamed: an interrupted download leaves no half file behind
            torch.hub.download_url_to_file(URL_INCEPTION_V3, cached, progress=progress)
        except Exception as error:  # noqa: BLE001 (URLError, HTTPError, timeouts, a full disk: all mean the same)
            raise QualityError(f"the Inception weights could not be downloaded ({_one_line(error)}); on a machine "
                               f"without internet, copy {URL_INCEPTION_V3} there by hand and give its path with "
                               "--fid-weights PATH") from None
    return cached


def weights_tag(path):
    """A short hash of a weights file, part of the name under which the reference's features are cached (features
    of other weights must never be reused)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---- FID, KID and IS through torch-fidelity -------------------------------------------------------------------

class Images(Dataset):
    """uint8 images (N, C, H, W) as torch-fidelity reads them: one uint8 (C, H, W) tensor per item, grey images given
    `channels` copies of their one channel (Inception takes RGB)."""

    def __init__(self, images, channels=3):
        self.images, self.channels = images, channels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]  # (C, H, W)
        return image.expand(self.channels, -1, -1) if image.shape[0] == 1 else image


def fidelity(samples, reference, features=INCEPTION, weights=None, device="cpu", reference_name=None,
             cache_dir=None, progress=True, batch_size=64):
    """FID, KID (mean and standard deviation over subsets) and, for 3-channel images in Inception's space, IS of
    `samples` against `reference`, both uint8 (N, C, H, W), computed by torch-fidelity in the feature space `features`
    (a feature extractor registered with torch-fidelity; `weights` its weights file). With reference_name and
    cache_dir, torch-fidelity keeps the reference's features and FID statistics in cache_dir under that name, and
    reads them there next time. Returns {"fid", "kid", "kid_std", "is", "is_std"} (IS None where not computed)."""
    device = torch.device(device)
    n, m = len(samples), len(reference)
    if min(n, m) < 2:
        raise QualityError(f"FID and KID need at least 2 images in each set, got {n} samples and {m} references")
    isc = features == INCEPTION and samples.shape[1] == 3
    channels = 3 if features == INCEPTION else samples.shape[1]
    kwargs = dict(input1=Images(samples, channels), input2=Images(reference, channels), fid=True, kid=True, isc=isc,
                  feature_extractor=features, feature_extractor_weights_path=weights, cuda=device.type == "cuda",
                  batch_size=batch_size, kid_subset_size=min(1000, n, m), isc_splits=min(10, n),
                  save_cpu_ram=True,  # no DataLoader workers: the images are already in memory
                  verbose=progress, cache=cache_dir is not None and reference_name is not None,
                  cache_root=cache_dir, input2_cache_name=reference_name)
    # torch-fidelity talks on stdout too (a note on negative KID): all of it goes to stderr, beside its progress bars.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), \
            contextlib.redirect_stdout(sys.stderr):
        metrics = torch_fidelity.calculate_metrics(**kwargs)
    return {"fid": metrics["frechet_inception_distance"], "kid": metrics["kernel_inception_distance_mean"],
            "kid_std": metrics["kernel_inception_distance_std"], "is": metrics.get("inception_score_mean"),
            "is_std": metrics.get("inception_score_std")}


def format_fidelity(result):
    """One line: FID, KID and IS (where there is one)."""
    text = f"FID {result['fid']:.2f}, KID {result['kid']:.4f} ± {result['kid_std']:.4f}"
    return text + (f", IS {result['is']:.2f} ± {result['is_std']:.2f}" if result.get("is") is not None else "")


# ---- The digits' feature space: a small classifier -------------------------------------------------------------

class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits in [0, 1]: two 3x3 convolutions, a 2x2 pool, then 128 features and 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2))  # (B, 64, 4, 4)
        self.features = nn.Linear(64 * 4 * 4, 128)
        self.logits = nn.Linear(128, 10)

    def forward(self, x):
        h = F.relu(self.features(self.conv(x).flatten(1)))  # (B, 128)
        return h, self.logits(h)  # (B, 128), (B, 10)


def train_digit_classifier(images, labels, steps=600, batch_size=64, seed=0):
    """DigitClassifier trained with Adam on uint8 digits (N, 1, 8, 8) and their labels, each batch shifted by up to a
    pixel (so that the features do not single out the training digits' exact positions); deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    net = DigitClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_all = images.float() / 255
    for _ in range(steps):
        chosen = torch.randint(len(images), (batch_size,), generator=generator)
        dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = torch.roll(F.pad(x_all[chosen], (1, 1, 1, 1)), (dy, dx), (2, 3))[..., 1:-1, 1:-1]  # (B, 1, 8, 8) shifted
        loss = F.cross_entropy(net(x)[1], labels[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def classify(net, images):
    """The classes (N,) that a DigitClassifier gives uint8 digits (N, 1, 8, 8)."""
    return net(images.float() / 255)[1].argmax(1)


class DigitFeatures(FeatureExtractorBase):
    """A DigitClassifier as a torch-fidelity feature extractor: "features" (128, for FID and KID, as Inception's 2048
    pool features) and "logits" (10, for IS); its weights come from feature_extractor_weights_path."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise QualityError("the digit classifier's features need its weights file")
        self.net = DigitClassifier()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):  # uint8 (B, 1, 8, 8)
        h, logits = self.net(x.float() / 255)
        return tuple({"features": h, "logits": logits}[name] for name in self.features_list)


if DIGITS not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:  # once, whoever imports this module first
    torch_fidelity.register_feature_extractor(DIGITS, DigitFeatures)


# ---- Checks that need no feature space --------------------------------------------------------------------------

def gaussian_fit_samples(reference, n, generator=None):
    """n uint8 images drawn from the Gaussian with the mean and covariance of the reference images (flattened, in
    float64), clamped to the pixel range and rounded: the simplest model of the data, the baseline to beat."""
    x = reference.flatten(1).double() / 255  # (M, D)
    mean = x.mean(0)
    cov = torch.cov(x.T)  # (D, D); singular where pixels never vary (a digit's border), hence the eigen-square root
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    root = eigenvectors * eigenvalues.clamp(min=0).sqrt()  # (D, D): root @ root.T = cov
    z = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    draws = mean + z @ root.T  # (n, D)
    return (draws.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, *reference.shape[1:])


@torch.no_grad()
def nearest_distances(images, reference, batch_size=1024, device="cpu"):
    """(N,) the Euclidean distance, in pixels scaled to [0, 1], from each image to its nearest reference image."""
    ref = reference.flatten(1).to(device, torch.float32) / 255  # (M, D)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].flatten(1).to(device, torch.float32) / 255  # (b, D)
        out.append(torch.cdist(x, ref).min(1).values.cpu())  # (b,)
    return torch.cat(out)
