"""The gate: is this a young child's frontal chest film? A small network trained for that
question, in front of the classifier.

`python -m training gate --out runs/gate-s0 --seed 0` trains one member (about 25 min on the
project's 2 cores); `python -m training gate-check --runs runs/gate-s0 ...` scores members
together on every check set (training.gate_check); `python -m training gated-model` writes the
model file (classifier and gate in one TorchScript file; training.gated_model).

Why a network of its own, and how it is kept from learning a hospital's look instead of
anatomy (docs/generalisation.md, "The gate"):
- **In**: the classifier's own training films (children aged 1-5, frontal chest, one centre),
  under the full acquisition augmentation of the classifier's recipe (field of view 0.6-1.3 with
  black, white or mirrored borders, aspect, centre shifts, rotation, gamma, blur or unsharp
  masking, noise, burned-in markers: training.augment.augment_pictures). Every plausible
  acquisition of a young child's chest must pass.
- **Out**: adult frontal chest films (`shared/data/adults_nih`, one hospital, split by patient)
  under the *same* augmentation, so framing, borders, crops and markers carry no signal; and
  made-up pictures that are no chest film at all (noise, gradients, chequerboards, text pages,
  CT-like slices, films turned on their side or upside down, grey levels inverted).
- **Style denied**: the adult films come from one hospital with its own processing (softer,
  lower contrast than the children's edge-enhanced films). Each film's spectrum is moved, at a
  random strength, towards the other set's mean radial log-amplitude profile (a linear filter
  that keeps the film's phase, i.e. its anatomy, and changes sharpness, noise and contrast per
  frequency band: `restyle`), so the two sets' processing overlaps and only shape separates them.

Output: one logit per film, positive = not a young child's frontal chest film. The ensemble's
score is the sigmoid of its members' mean logit; the film abstains above the threshold, which
is set by GATE_THRESHOLD_RULE on children's validation films only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from training.augment import augment_pictures
from training.data import DEFAULT_CACHE_DIR, PICTURE_SIZE, ImageSet, load_pictures, load_split
from training.models import pacs_cnn

GATE_WIDTHS = (16, 24, 32, 48, 64)
GATE_QUANTILE = 0.99
GATE_THRESHOLD_RULE = ("the 0.99 quantile of the gate score over the children's validation films "
                       "pooled over the unshifted split and every stress condition "
                       "(training.shifts): about 1 % of children's films under every shift abstain")
ADULT_VALIDATION_FRACTION = 0.3
DEFAULT_ADULTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "adults_nih"
GATE_METHOD = ("a separate CNN (5 conv blocks on the input average-pooled to 100 x 100) per "
               "member, trained to tell the children's training films from adult chest films and "
               "made-up non-chest pictures, both under the same acquisition augmentation and a "
               "spectral style mix; score = sigmoid of the members' mean logit")


def gate_network() -> nn.Sequential:
    """The gate member: pacs_cnn's shape, narrower (0.1 M parameters), one logit for 'out'."""
    return pacs_cnn(widths=GATE_WIDTHS, dropout=0.3, downsample=2)


# --- the data -----------------------------------------------------------------------------------

@dataclass
class GateData:
    """uint8 pictures [N, 224, 224] of each side, with the files they came from."""

    children_train: ImageSet
    children_validation: ImageSet
    adults_train: ImageSet
    adults_validation: ImageSet

    def describe(self) -> dict:
        return {"children_train": len(self.children_train),
                "children_validation": len(self.children_validation),
                "adults_train": len(self.adults_train),
                "adults_validation": len(self.adults_validation)}


def adult_split(adults: ImageSet, seed: int = 0) -> dict[str, list[str]]:
    """The adult films split by patient (training.split: patient and duplicate groups)."""
    from training.split import make_split

    split = make_split(adults, ADULT_VALIDATION_FRACTION, seed)
    return {part: [adults.paths[i].name for i in split[part]] for part in ("train", "validation")}


def load_gate_data(children_split_file: Path, children_root: Path, adults_root: Path,
                   adult_split_seed: int = 0, cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[
                       GateData, dict]:
    """Children: the classifier's own split (its split.json); adults: split here by patient.
    Returns the data and the split record to save beside the run."""
    children_split = json.loads(Path(children_split_file).read_text())
    names = set(children_split["train"]) | set(children_split["validation"])
    children = load_pictures(load_split(children_root, "train", cache_dir, progress=False,
                                        names=names), cache_dir, progress=False)
    adults = load_pictures(load_split(adults_root.parent, adults_root.name, cache_dir,
                                      progress=False), cache_dir, progress=False)
    split = adult_split(adults, adult_split_seed)

    def part(images: ImageSet, wanted: list[str]) -> ImageSet:
        index = {p.name: i for i, p in enumerate(images.paths)}
        return images.subset([index[n] for n in wanted])

    data = GateData(part(children, children_split["train"]),
                    part(children, children_split["validation"]),
                    part(adults, split["train"]), part(adults, split["validation"]))
    record = {"children_split_file": str(children_split_file), "adult_split_seed": adult_split_seed,
              "adult_rule": "grouped by patient (first 8 digits of the NIH name) and md5, "
                            f"{ADULT_VALIDATION_FRACTION:.0%} per class to validation",
              "adults": split}
    return data, record


# --- style: each set's mean radial log-amplitude spectrum -------------------------------------

def _radius_bins(size: int = PICTURE_SIZE) -> torch.Tensor:
    """The integer radius of every frequency of an rfft2 of a size x size picture."""
    fy = torch.fft.fftfreq(size) * size
    fx = torch.fft.rfftfreq(size) * size
    return torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2).round().long().clamp(max=size // 2)


def log_amplitude_profile(pictures: np.ndarray, batch: int = 256) -> np.ndarray:
    """Mean log amplitude per integer radius [size // 2 + 1] of uint8 pictures [N, S, S] (each
    picture's mean removed): how much of the picture lives at each scale, averaged over a set."""
    bins = _radius_bins(pictures.shape[-1]).flatten()
    counts = torch.bincount(bins).double()
    total = torch.zeros_like(counts)
    for start in range(0, len(pictures), batch):
        values = torch.from_numpy(np.asarray(pictures[start:start + batch], np.float32))
        values = values - values.mean(dim=(1, 2), keepdim=True)
        amplitude = torch.log(torch.fft.rfft2(values).abs() + 1e-3).double()
        total += torch.zeros_like(counts).index_add_(0, bins, amplitude.sum(0).flatten())
    return (total / (counts * len(pictures))).numpy()


def restyle(pictures: torch.Tensor, towards: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Move pictures [N, S, S] (grey levels 0-255, float) towards another set's processing:
    multiply each frequency by exp(strength * towards[radius]) (towards: the other set's
    log-amplitude profile minus this set's), the mean grey kept; phase, and so the anatomy,
    unchanged. strength 0 leaves a picture as it is, 1 gives it the other set's mean profile."""
    size = pictures.shape[-1]
    bins = _radius_bins(size)
    gain = torch.exp(strength.view(-1, 1, 1) * towards.float()[bins].unsqueeze(0))
    gain[:, 0, 0] = 1.0
    spectrum = torch.fft.rfft2(pictures) * gain
    return torch.fft.irfft2(spectrum, s=(size, size)).clamp(0, 255)


# --- made-up pictures: what is no child's frontal chest film at all ---------------------------

MADE_UP_KINDS = ("noise", "smooth-noise", "gradient", "chequerboard", "text-page", "ct-slice",
                 "turned", "upside-down", "inverted")


def ct_like_slice(rng: np.random.Generator, size: int = PICTURE_SIZE) -> np.ndarray:
    """An axial CT-like picture: a body ellipse on black, two dark lungs, a bright spine."""
    picture = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(picture)
    half_w, half_h = size * rng.uniform(0.3, 0.47), size * rng.uniform(0.2, 0.36)
    centre_x, centre_y = size / 2 + rng.uniform(-10, 10), size / 2 + rng.uniform(-10, 10)
    draw.ellipse([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h],
                 fill=float(rng.uniform(90, 150)))
    for side in (-1, 1):
        lung_x = centre_x + side * half_w * rng.uniform(0.35, 0.55)
        lung_w, lung_h = half_w * rng.uniform(0.25, 0.4), half_h * rng.uniform(0.45, 0.75)
        draw.ellipse([lung_x - lung_w, centre_y - lung_h, lung_x + lung_w, centre_y + lung_h],
                     fill=float(rng.uniform(5, 40)))
    spine = half_h * rng.uniform(0.12, 0.2)
    spine_y = centre_y + half_h * 0.6
    draw.ellipse([centre_x - spine, spine_y - spine, centre_x + spine, spine_y + spine],
                 fill=float(rng.uniform(200, 255)))
    values = np.asarray(picture, dtype=np.float32)
    return np.clip(values + rng.normal(0, rng.uniform(1, 8), values.shape), 0, 255)


def text_page(rng: np.random.Generator, size: int = PICTURE_SIZE) -> np.ndarray:
    page = Image.new("L", (size, size), int(rng.integers(180, 256)))
    draw = ImageDraw.Draw(page)
    words = ("REPORT", "PATIENT", "CHEST", "DOSE", "mAs", "kVp", "SCAN", "12.3")
    for line in range(int(rng.integers(3, 16))):
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 6))))
        draw.text((int(rng.integers(2, 40)), 8 + 14 * line), text, fill=int(rng.integers(0, 80)))
    return np.asarray(page, dtype=np.float32)


def made_up_picture(kind: str, rng: np.random.Generator, real: np.ndarray) -> np.ndarray:
    """One picture of a kind; `real` is a film (uint8 [S, S]) for the kinds made from one."""
    size = PICTURE_SIZE
    rows, columns = np.indices((size, size))
    if kind == "noise":
        return rng.uniform(0, 255, (size, size)).astype(np.float32)
    if kind == "smooth-noise":
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 16)),) * 2).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize(
            (size, size), Image.Resampling.BICUBIC), dtype=np.float32).clip(0, 255)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        return (np.cos(angle) * columns + np.sin(angle) * rows).astype(np.float32)
    if kind == "chequerboard":
        cell = int(rng.integers(4, 48))
        return (((rows // cell + columns // cell) % 2) * 255.0).astype(np.float32)
    if kind == "text-page":
        return text_page(rng)
    if kind == "ct-slice":
        return ct_like_slice(rng)
    film = real.astype(np.float32)
    if kind == "turned":
        return np.rot90(film, k=1 if rng.random() < 0.5 else 3).copy()
    if kind == "upside-down":
        return film[::-1].copy()
    if kind == "inverted":
        return 255.0 - film
    raise ValueError(f"unknown kind {kind!r}")


# --- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateRecipe:
    epochs: int = 14
    steps_per_epoch: int = 150
    children_per_batch: int = 24
    adults_per_batch: int = 16
    made_up_per_batch: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    restyle_chance: float = 0.6
    restyle_strength: tuple[float, float] = (-0.5, 1.3)


def _restyled(pictures: np.ndarray, towards: torch.Tensor, recipe: GateRecipe,
              generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, S, S] -> uint8 tensor, each picture moved towards the other set's processing
    with recipe.restyle_chance (negative strengths: further from it)."""
    values = torch.from_numpy(np.asarray(pictures, np.float32))
    count = len(values)
    low, high = recipe.restyle_strength
    strength = torch.rand(count, generator=generator) * (high - low) + low
    strength = strength * (torch.rand(count, generator=generator) < recipe.restyle_chance)
    return restyle(values, towards, strength).round().to(torch.uint8)


def gate_batch(data: GateData, styles: dict[str, np.ndarray], recipe: GateRecipe,
               generator: torch.Generator, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch: (model inputs [N, 1, 200, 200], labels [N], 1 = out)."""
    def draw(images: ImageSet, count: int) -> np.ndarray:
        return images.pictures[np.sort(rng.choice(len(images), count,
                                                  replace=len(images) < count))]

    children = draw(data.children_train, recipe.children_per_batch)
    adults = draw(data.adults_train, recipe.adults_per_batch)
    to_adult = torch.from_numpy(styles["adults"] - styles["children"])
    pictures = [_restyled(children, to_adult, recipe, generator),
                _restyled(adults, -to_adult, recipe, generator)]
    made_up = []
    for _ in range(recipe.made_up_per_batch):
        kind = MADE_UP_KINDS[int(rng.integers(len(MADE_UP_KINDS)))]
        pool = data.children_train if rng.random() < 0.5 else data.adults_train
        real = pool.pictures[int(rng.integers(len(pool)))]
        made_up.append(np.clip(made_up_picture(kind, rng, real), 0, 255).round().astype(np.uint8))
    pictures.append(torch.from_numpy(np.stack(made_up)))
    inputs = augment_pictures(torch.cat(pictures), generator)
    labels = torch.cat([torch.zeros(recipe.children_per_batch),
                        torch.ones(recipe.adults_per_batch + recipe.made_up_per_batch)])
    return inputs, labels


@torch.inference_mode()
def gate_logits(networks: list[nn.Module], inputs: np.ndarray, batch: int = 128) -> np.ndarray:
    """The members' mean logit for model inputs [N, 200, 200] or [N, 1, 200, 200]."""
    for network in networks:
        network.eval()
    outputs = []
    for start in range(0, len(inputs), batch):
        x = torch.from_numpy(np.asarray(inputs[start:start + batch], np.float32))
        x = x.reshape(-1, 1, *x.shape[-2:])
        outputs.append(torch.stack([network(x) for network in networks]).mean(0).numpy())
    return np.concatenate(outputs) if outputs else np.empty(0, np.float32)


def gate_scores(networks: list[nn.Module], inputs: np.ndarray) -> np.ndarray:
    """The ensemble's score in (0, 1): sigmoid of the members' mean logit."""
    return 1.0 / (1.0 + np.exp(-gate_logits(networks, inputs).astype(np.float64)))


def roc_auc_out(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Probability that an 'out' film scores above an 'in' film."""
    from pacs_ai.evaluate.evaluation import roc_auc

    return roc_auc(np.concatenate([scores_in, scores_out]),
                   np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))].astype(int))


def train_gate(data: GateData, out: Path, seed: int = 0, recipe: GateRecipe = GateRecipe(),
               split_record: dict | None = None, progress: bool = True) -> dict:
    """Train one member; writes out/checkpoint.pt, config.json, history.json, styles.npz."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    styles = {"children": log_amplitude_profile(data.children_train.pictures),
              "adults": log_amplitude_profile(data.adults_train.pictures)}
    np.savez(out / "styles.npz", **styles)
    if split_record is not None:
        (out / "split.json").write_text(json.dumps(split_record, indent=1))
    (out / "config.json").write_text(json.dumps(
        {"seed": seed, "recipe": recipe.__dict__, "widths": GATE_WIDTHS, **data.describe()},
        indent=2, default=list))
    network = gate_network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay)
    total_steps = recipe.epochs * recipe.steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate,
                                                   total_steps=total_steps, pct_start=0.2)
    children_inputs = data.children_validation.inputs
    adult_inputs = data.adults_validation.inputs
    history = []
    started = time.monotonic()
    for epoch in range(1, recipe.epochs + 1):
        network.train()
        total_loss = 0.0
        for _ in range(recipe.steps_per_epoch):
            inputs, labels = gate_batch(data, styles, recipe, generator, rng)
            loss = F.binary_cross_entropy_with_logits(network(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        scores_in = gate_logits([network], children_inputs)
        scores_out = gate_logits([network], adult_inputs)
        threshold = float(np.quantile(scores_in, GATE_QUANTILE))
        history.append({"epoch": epoch, "train_loss": total_loss / recipe.steps_per_epoch,
                        "auc_children_vs_adults": roc_auc_out(scores_in, scores_out),
                        "adults_out_at_clean_0.99": float((scores_out > threshold).mean()),
                        "elapsed_s": round(time.monotonic() - started, 1)})
        if progress:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in history[-1].items()}), flush=True)
    torch.save(network.state_dict(), out / "checkpoint.pt")
    (out / "history.json").write_text(json.dumps(history, indent=2))
    summary = {"seed": seed, "training_seconds": round(time.monotonic() - started, 1),
               **history[-1]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_gate_member(run: Path) -> nn.Sequential:
    network = gate_network()
    network.load_state_dict(torch.load(Path(run) / "checkpoint.pt", weights_only=True))
    return network.eval()


def threshold_for(children_scores: dict[str, np.ndarray]) -> float:
    """GATE_THRESHOLD_RULE: children's validation scores per condition (the unshifted split
    included) -> the abstention threshold."""
    pooled = np.concatenate(list(children_scores.values()))
    return float(np.quantile(pooled, GATE_QUANTILE))
