"""Guidance (`sample --guidance`) never draws character soup: the contrast acts only among the characters
the sample's own stream finds plausible (charrnn/sample.py guided_logits)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from charrnn.sample import GUIDANCE_PLAUSIBLE, guided_logits
from conftest import TINY, make_text, run_cli

RARE = "ÜúèážÁÕë³‘"  # characters as rare in the corpus as non-ASCII ones are in real reviews


@pytest.fixture(scope="module")
def rare_run(tmp_path_factory):
    """A tiny LSTM trained on the grammar text, one line in 40 ending in a rare character; and the
    text's common characters (0.2% of it or more)."""
    d = tmp_path_factory.mktemp("rare")
    rng = random.Random(0)
    lines = make_text(20_000).splitlines()
    for i in range(0, len(lines), 40):
        lines[i] = lines[i][:-1] + rng.choice(RARE) + "."
    text = "\n".join(lines) + "\n"
    (d / "c.txt").write_text(text)
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:  # the module's run keeps its corpus cache in its own folder
        mp.chdir(d)
        mp.setenv("CHARRNN_CACHE", str(d / ".cache"))
        r = run_cli("train", d / "c.txt", *TINY, "--steps", "150", "--threads", "1", "--run", d / "run")
    assert r.exit_code == 0, r.stderr
    common = {c for c, n in Counter(text).items() if n >= 0.002 * len(text)}
    assert not set(RARE) & common
    return d / "run", common


def odd_share(run, common, *args) -> float:
    r = run_cli("sample", run, "--num", "40", "--length", "200", "--prime", "The", "--jsonl", *args)
    assert r.exit_code == 0, r.stderr
    gen = "".join(json.loads(line)["text"][3:] for line in r.stdout.splitlines())
    return sum(c not in common for c in gen) / len(gen)


def test_large_guidance_draws_no_character_soup(rare_run):
    """Unit 0 fixed at +-5 and contrasted with guidance 3: the old draw, own + 3 * (own - opposite) over
    every character, wrote about 20% rare characters ("yoMá\\nTnptÕly.puh.\\nGooovgÕvvÜ"); guided
    only among the own stream's plausible characters, they stay as rare as the text has them."""
    run, common = rare_run
    for seed in ("1", "2"):
        for value, guidance in (("5", "3"), ("2", "3"), ("5", "1")):
            share = odd_share(run, common, "--neuron", "0", "--value", value, "--guidance", guidance, "--seed", seed)
            assert share < 0.005, (seed, value, guidance, share)


def test_guided_logits_contrast_only_the_plausible_characters():
    torch.manual_seed(0)
    own, other = torch.randn(3, 12) * 4, torch.randn(3, 12) * 4
    g = 0.7
    mixed = guided_logits(own, other, g)
    lp, lq = torch.log_softmax(own, -1), torch.log_softmax(other, -1)
    plausible = lp >= lp.max(-1, keepdim=True).values + math.log(GUIDANCE_PLAUSIBLE)
    assert plausible.any(-1).all() and not plausible.all()
    # ruled out by the own stream: never drawn, however unlikely under the opposite one
    assert torch.isinf(mixed[~plausible]).all() and (mixed[~plausible] < 0).all()
    # on the plausible ones: p_own^(1+g) / p_other^g, whatever constant the raw logits carry
    assert torch.allclose(mixed[plausible], ((1 + g) * lp - g * lq)[plausible], atol=1e-5)
    assert torch.allclose(guided_logits(own + 9.0, other - 3.0, g), mixed, atol=1e-5)
    # guidance 0 is the own stream, cut to its plausible characters
    same = torch.softmax(guided_logits(own, other, 0.0), -1)
    assert torch.allclose(same, torch.softmax(lp.masked_fill(~plausible, float("-inf")), -1), atol=1e-6)
