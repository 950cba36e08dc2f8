"""The shapes world's autoencoder recipe (demo/autoencoder_recipe.py) on top of the generic
trainer: object-centred crops, the world's loss terms, and its check of the crop size."""

from __future__ import annotations

import pytest
import torch

from demo.autoencoder_recipe import ShapesWorldRecipe, demo_autoencoder_config, object_crops
from train.autoencoder import (
    AutoencoderTrainConfig,
    TrainingRecipe,
    build_autoencoder,
    train_autoencoder,
)

pytestmark = pytest.mark.timeout(120)


def test_object_crops_stay_inside_and_find_the_objects():
    # 64 px black images, one 6 px white square each at a random place.
    generator = torch.Generator().manual_seed(0)
    corners = torch.randint(0, 58, (400, 2), generator=generator)
    images = torch.full((400, 3, 64, 64), -1.0)
    for i, (y, x) in enumerate(corners.tolist()):
        images[i, :, y : y + 6, x : x + 6] = 1.0
    crops = object_crops(images, 32, generator)
    assert crops.shape == (400, 3, 32, 32)
    with_object = (crops.amax(dim=(1, 2, 3)) > 0).float().mean()
    # Half the crops aim at the object and always hold it; the uniform half holds it about a
    # quarter of the time (a 32 px window of 64 px), so about 0.5 + 0.5 * ~0.3 in all.
    assert 0.55 < with_object < 0.9, with_object
    whole = object_crops(images, 64, generator)
    assert torch.equal(whole, images)


def test_recipe_crops_early_and_trains_on_whole_images_at_the_end():
    config = demo_autoencoder_config(steps=10, time_budget_s=60, n_images=64)
    recipe, generator = ShapesWorldRecipe(), torch.Generator().manual_seed(0)
    train = torch.randint(0, 255, (20, 3, 64, 64), dtype=torch.uint8)
    early = recipe.batch(train, 0, 0.1, config, generator)
    late = recipe.batch(train, 9, 0.9, config, generator)
    assert early.shape == (recipe.crop_batch_size, 3, 32, 32)
    assert late.shape == (config.batch_size, 3, 64, 64)
    plain = TrainingRecipe().batch(train, 0, 0.1, config, generator)
    assert plain.shape == (config.batch_size, 3, 64, 64)  # the generic trainer never crops


def test_world_loss_weighs_colour_errors_the_plain_loss_barely_sees():
    config = AutoencoderTrainConfig(block_out_channels=(8, 8), norm_num_groups=4, kl_weight=0)
    torch.manual_seed(0)
    vae = build_autoencoder(config)
    x = torch.full((2, 3, 16, 16), -0.5)
    x[:, 0, 4:10, 4:10] = 0.9  # a red square on grey
    world, plain = ShapesWorldRecipe(), TrainingRecipe()
    # The same network and input: the world's terms only add (weights >= 1, extra L1s).
    torch.manual_seed(1)
    world_loss = world.loss(vae, x, config)
    torch.manual_seed(1)
    plain_loss = plain.loss(vae, x, config)
    assert world_loss > 2 * plain_loss > 0


def test_recipe_rejects_crops_the_latent_grid_cannot_hold():
    config = demo_autoencoder_config(steps=10, time_budget_s=60, n_images=64)  # downsample 4
    with pytest.raises(ValueError, match="crop_size"):
        ShapesWorldRecipe(crop_size=34).check(config)


def test_generic_trainer_runs_a_custom_recipe(tmp_path):
    calls = []

    class Counting(TrainingRecipe):
        def batch(self, train, step, progress, config, generator):
            calls.append((step, progress))
            return super().batch(train, step, progress, config, generator)

    config = AutoencoderTrainConfig(steps=3, batch_size=2, block_out_channels=(8, 8),
                                    norm_num_groups=4, image_size=16, heldout_images=2,
                                    warmup_steps=1, num_threads=1)
    images = torch.randint(0, 255, (12, 3, 16, 16), dtype=torch.uint8)
    result = train_autoencoder(images, tmp_path / "vae", config, Counting())
    assert result.steps == 3 and [s for s, _ in calls] == [0, 1, 2]
    assert all(0 <= p < 1 for _, p in calls)


def test_nothing_under_train_or_pipeline_imports_the_demo():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    offenders = [str(path.relative_to(repo)) for folder in ("train", "pipeline")
                 for path in (repo / folder).rglob("*.py")
                 if any(line.lstrip().startswith(("from demo", "import demo"))
                        for line in path.read_text().splitlines())]
    assert offenders == []
