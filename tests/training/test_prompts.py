"""Seg-tag prompts, deterministic text dropout and the character-level tokenizer."""

import numpy as np
import pytest

from segsr_jax import weights
from segsr_jax.training import prompts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = prompts.write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", 12)
    return weights.load_tokenizer(folder.parent)


def test_char_tokenizer_spells_words(tokenizer):
    ids = tokenizer(["Sky, grass", "", "a" * 40])
    assert ids.shape == (3, 12) and ids.dtype == np.int32
    assert ids.max() < prompts.CHAR_VOCAB_SIZE
    bos, eos = prompts.CHAR_VOCAB_SIZE - 2, prompts.CHAR_VOCAB_SIZE - 1
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (bos, eos)
    # lower-cased characters; a word's last one is the "</w>" variant (id + 256)
    want = [
        bos,
        ord("s"),
        ord("k"),
        ord("y") + 256,
        ord(",") + 256,
        ord("g"),
        ord("r"),
        ord("a"),
        ord("s"),
        ord("s") + 256,
        eos,
        eos,
    ]
    np.testing.assert_array_equal(ids[0], want)
    np.testing.assert_array_equal(ids[1], [bos] + [eos] * 11)
    assert ids[2, -1] == eos  # truncated, still closed


def test_seg_tags_largest_first_without_ignore():
    y = np.array([[0, 2, 2, 255], [2, 2, 2, 255], [1, 1, 1, 0]], np.uint8)  # 2 x5, 1 x3, 0 x2
    assert prompts.seg_tags(y, ("sky", "grass", "brick"), max_tags=8) == "brick, grass, sky"
    assert prompts.seg_tags(y, ("sky", "grass", "brick"), max_tags=2) == "brick, grass"
    assert prompts.seg_tags(np.full((2, 2), 255, np.uint8), ("a",), 3) == ""


def test_dropout_is_a_pure_function_of_step_and_process(tokenizer):
    labels = np.zeros((64, 4, 4), np.uint8)
    cfg = prompts.PromptConfig(mode="tags", dropout=0.5, seed=3)
    maker = prompts.PromptMaker(tokenizer, ("sky",), cfg)
    a, b = maker.prompts(labels, step=7), maker.prompts(labels, step=7)
    assert a == b and set(a) == {"", "sky"}
    assert 16 < a.count("") < 48
    assert maker.prompts(labels, step=8) != a
    other = prompts.PromptMaker(tokenizer, ("sky",), cfg, process_index=1)
    assert other.prompts(labels, step=7) != a
    np.testing.assert_array_equal(maker(labels, 7), tokenizer(a))
    fixed = prompts.PromptMaker(
        tokenizer, (), prompts.PromptConfig(mode="fixed", text="hi", dropout=0.0)
    )
    assert fixed.prompts(labels[:2], 0) == ["hi", "hi"]
    with pytest.raises(ValueError, match="class_names"):
        prompts.PromptMaker(tokenizer, (), cfg)


def test_sampling_defaults_follow_the_training_prompts():
    """A run trained with seg-tag prompts samples with them (its max_tags); a fixed-prompt run
    or options that name a prompt mode keep theirs."""
    from segsr_jax.training.run_setup import sampling_defaults
    from tests.training.tiny_train_config import get_config

    c = get_config("seg")
    got = sampling_defaults(c)
    assert (got["prompt_mode"], got["max_tags"]) == ("tags", c.train.prompt.max_tags)
    c.train.prompt.mode = "fixed"
    assert "prompt_mode" not in sampling_defaults(c)
    c.train.prompt.mode = "tags"
    c.sample.options.prompt_mode = "fixed"
    assert sampling_defaults(c)["prompt_mode"] == "fixed"


def test_sampling_defaults_keep_the_step_mean_map_unless_the_options_say():
    """Checkpoints default to the step-mean map, also those of a SegDM trained on the sampler's
    state (its last step was measured below its best); options that name a map keep it."""
    from segsr_jax.diffusion.options import SampleOptions
    from segsr_jax.training.run_setup import sampling_defaults
    from tests.training.tiny_train_config import get_config

    c = get_config("joint")
    assert SampleOptions.from_dict(sampling_defaults(c)).seg_map == "mean"
    c.loss.seg_rollout_steps = 2
    assert SampleOptions.from_dict(sampling_defaults(c)).seg_map == "mean"
    c.sample.options.seg_map = "last"
    assert sampling_defaults(c)["seg_map"] == "last"
    assert SampleOptions.from_dict(sampling_defaults(c)).seg_map == "last"
    with pytest.raises(ValueError, match="seg_map"):
        SampleOptions(seg_map="best")
