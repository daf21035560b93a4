"""Which label-free embedding lets cycle 0's TypiClust find the classes (orchestrator/al/cold_start.py).

Simulates a small pool (built-in classes, SNR 0.05 by default) or reads the train split of an
existing one (`--pool`), embeds every subtomogram with (a) the cold start's two embeddings,
`density` (quantiles of the low-passed density's particle tail) and `radial` (shell profiles and
power), and (b) a random ResNet-10's penultimate features (BatchNorm statistics set on 256 of the
volumes, as TypiClust's "random network" option), runs k-means with as many clusters as classes
(3 seeds) and prints the normalised mutual information between clusters and classes (0 = no
better than chance; random vectors for reference):

    python bench/cold_start_embeddings.py                 # 10 classes × 30, SNR 0.05
    python bench/cold_start_embeddings.py --snr 0.1 --classes 13 --per-class 40
    python bench/cold_start_embeddings.py --pool runs/bench/label_efficiency/pools/shrec13_snr0.05
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def normalised_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """NMI with the arithmetic mean of the two entropies."""
    a = np.unique(a, return_inverse=True)[1]
    b = np.unique(b, return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())

    def entropy(p):
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    return mi / ((entropy(pa) + entropy(pb)) / 2)


def cluster_score(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> float:
    from orchestrator.al.selection_math import kmeans

    z = (embeddings - embeddings.mean(0)) / (embeddings.std(0) + 1e-9)
    return float(np.mean([normalised_mutual_information(
        labels, kmeans(z, classes, np.random.default_rng(seed), 30)[0]) for seed in range(3)]))


def random_network(volumes: np.ndarray, classes: int, seed: int) -> np.ndarray:
    import torch

    from orchestrator.nn.learning import recalibrated
    from orchestrator.nn.outputs import forward_outputs
    from orchestrator.nn.model import build_model

    torch.manual_seed(seed)
    model = build_model("resnet10", num_classes=classes, width=16, stem="full")
    x = torch.from_numpy(volumes).float()
    model = recalibrated(model, [(x[i:i + 32], None) for i in range(0, min(256, len(x)), 32)])
    return forward_outputs(model, None, x, {"embeddings"})["embeddings"]


def embed(path: str):
    """(labels, {embedding: (features, seconds)}, volumes) of the pool's train rows."""
    from orchestrator.al.cold_start import EMBEDDINGS, particle_tail, pool_features
    from orchestrator.data.pool import read_index, read_volumes

    index = read_index(path, ["row", "label", "split"]).sort_by("row")
    train = np.array(index.column("split").to_pylist()) == "train"
    rows = index.column("row").to_numpy()[train]
    embeddings = {}
    for name in EMBEDDINGS:
        started = time.perf_counter()
        features = pool_features(path, rows, embedding=name)
        features = particle_tail(features) if name == "density" else features
        embeddings[name] = (features, time.perf_counter() - started)
    return index.column("label").to_numpy()[train], embeddings, read_volumes(path, rows.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--pool", help="an existing pool: embed its train split instead")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        if args.pool:
            path, title = args.pool, f"the train split of {args.pool}"
        else:
            from orchestrator.data.simulate import SimulationConfig, simulate_pool

            cfg = SimulationConfig(structures=f"builtin:{args.classes}", per_class=args.per_class,
                                   snr=args.snr)
            path = simulate_pool(None, cfg, Path(folder) / "pool", workers=1, progress=False).path
            title = f"{args.classes} built-in classes × {args.per_class}, SNR {args.snr:g}"
        labels, embeddings, volumes = embed(path)
    classes = len(np.unique(labels))
    print(f"{len(labels)} subtomograms, {classes} classes: {title}")
    print("| embedding | NMI of k-means clusters with the classes |\n|---|---|")
    for name, (features, seconds) in embeddings.items():
        print(f"| {name} (cold start; {seconds:.1f} s) | {cluster_score(features, labels, classes):.3f} |")
    for seed in (0, 1):
        score = cluster_score(random_network(volumes, classes, seed), labels, classes)
        print(f"| random ResNet-10, seed {seed} | {score:.3f} |")
    noise = np.random.default_rng(0).standard_normal((len(labels), 8))
    print(f"| random vectors | {cluster_score(noise, labels, classes):.3f} |")


if __name__ == "__main__":
    main()
