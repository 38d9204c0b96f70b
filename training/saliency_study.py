"""Which saliency map to ship: the deletion check of `training/explain.py` for several map
methods and layers, on the first N pneumonia films of the shipped model's validation split
(the selection set; `python -m training explain --start N` then measures the chosen one on the
rest). Not used by the service.

    .venv/bin/python -m training.saliency_study --films 96 16:grad 16:hires 22:grad 22:hires \
        23:grad 23:hires 29:grad 29:hires 30:grad

Each spec is TAP:KIND. TAP counts the layers of a member (pacs-cnn-robust: CenterInput, AvgPool,
stem conv, BN, ReLU, then the blocks) whose output the map is taken at: 16 = the stem's end
(after the second max-pool, 12 x 12), 22 = the next block before its max-pool (12 x 12),
23 = after it (6 x 6), 29 = the last block before its max-pool (6 x 6), 30 = after it (3 x 3).
KIND: grad = Grad-CAM (channel weights = the gradient's spatial mean), hires = HiResCAM
(gradient x activation, summed over channels). Maps of the members are summed, then the ReLU;
the region rule is pacs_ai.model.heatmap's, the same random placements (seed 0) for every method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pacs_ai.config import default_model_path
from pacs_ai.model import heatmap
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.preprocessing import to_model_input
from training.cli import DEFAULT_DATA
from training.ensemble import EnsembleNetwork
from training.explain import occluded, random_placement, validation_pneumonia_films
from training.models import CONFIGS, build_network


def member_layers(model: PneumoniaModel) -> tuple[EnsembleNetwork, list[list[torch.nn.Module]]]:
    ensemble = EnsembleNetwork([build_network(CONFIGS[m["config"]])
                                for m in model.info.metadata["training"]["members"]])
    ensemble.load_state_dict(model.module.state_dict())
    ensemble.eval()
    members = [list(stem) + list(tail) + [head]
               for stem, tail, head in zip(ensemble.stems, ensemble.tails, ensemble.heads)]
    for layers in members:
        for layer in layers:
            if isinstance(layer, torch.nn.ReLU):
                layer.inplace = False  # the tap's activation must survive the next layer
    return ensemble, members


def maps_of(members, inputs: torch.Tensor, tap: int, kind: str) -> np.ndarray:
    total = 0
    for layers in members:
        activation = inputs
        with torch.no_grad():
            for layer in layers[:tap]:
                activation = layer(activation)
        activation = activation.detach().requires_grad_(True)
        output = activation
        for layer in layers[tap:]:
            output = layer(output)
        (gradient,) = torch.autograd.grad(output.sum() / len(members), [activation])
        if kind == "grad":
            cam = (gradient.mean((2, 3), keepdim=True) * activation).sum(1)
        elif kind == "hires":
            cam = (gradient * activation).sum(1)
        else:
            raise SystemExit(f"unknown kind {kind!r} (grad, hires)")
        total = total + cam.detach()
    return torch.relu(total).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="TAP:KIND, e.g. 22:hires")
    parser.add_argument("--films", type=int, default=96)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    from PIL import Image

    model = PneumoniaModel.load(args.model)
    ensemble, members = member_layers(model)
    paths = validation_pneumonia_films(args.model, args.data, None)[:args.films]
    films = [np.asarray(Image.open(p).convert("L")) for p in paths]
    inputs = np.stack([to_model_input(f) for f in films])

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ensemble(torch.from_numpy(batch)).double().numpy()

    base = logits(inputs)
    print("| map | grid | films | region drops the score more than a random one | median "
          "drop, region | median drop, random | median region area |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.specs:
        tap, kind = spec.split(":")
        maps = maps_of(members, torch.from_numpy(inputs), int(tap), kind)
        rng = np.random.default_rng(0)
        variants, areas = [], []
        for film, raw in zip(films, maps):
            grid = heatmap.normalised(raw)
            if grid is None:  # flat: the whole film is the region
                grid = np.ones_like(raw, dtype=np.float16)
            region = heatmap.to_film(heatmap.region_polygon(grid), grid.shape, *film.shape)
            elsewhere = random_placement(region, *film.shape, rng)
            variants += [to_model_input(occluded(film, region)),
                         to_model_input(occluded(film, elsewhere))]
            areas.append(heatmap.polygon_area(region) / film.size)
        scores = logits(np.stack(variants))
        region_drop, random_drop = base - scores[0::2], base - scores[1::2]
        print(f"| {kind} at layer {tap} | {maps.shape[1]} x {maps.shape[2]} | {len(films)} | "
              f"{(region_drop > random_drop).mean():.1%} | {np.median(region_drop):.2f} | "
              f"{np.median(random_drop):.2f} | {np.median(areas):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
