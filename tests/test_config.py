import hashlib
import json
from pathlib import Path

import pytest

from ttc_mlops.config import (
    EMBEDDED_MODEL,
    Recipe,
    RecipeError,
    build_recipe,
    load_recipe,
    parse_override,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes_for_both_models():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    assert ("SmolLM2-135M-Instruct", "best_of_n") in names
    assert ("Llama-3.2-1B-Instruct", "best_of_n") in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.approach == path.stem


def test_reference_recipe_keys_load_unchanged():
    # the keys of search-and-learn's recipes, as they write them
    data = {"approach": "dvts", "model_path": "meta-llama/Llama-3.2-1B-Instruct", "n": 16, "beam_width": 4,
            "num_iterations": 40, "lookahead": 0, "temperature": 0.8, "top_p": 1.0, "max_tokens": 2048,
            "agg_strategy": "last", "search_batch_size": 1, "prm_batch_size": 4, "seed": 0,
            "custom_chat_template": None, "dataset_name": "HuggingFaceH4/MATH-500", "dataset_config": None,
            "dataset_split": "test", "dataset_start": 0, "dataset_end": 500, "num_samples": None,
            "filter_duplicates": False, "sort_completed": False, "output_dir": None, "push_to_hub": False,
            "hub_dataset_id": None, "hub_dataset_private": False, "overwrite_hub_revision": False,
            "apply_voting": True, "gpu_memory_utilization": 0.5, "num_proc": None,
            "prm_path": "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", "system_prompt": "Solve it."}
    recipe = build_recipe(data)
    assert recipe.n == 16 and recipe.beam_width == 4


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("approach: best_of_n\nbeam_widht: 4\n")
    with pytest.raises(RecipeError, match="unknown key 'beam_widht'"):
        load_recipe(f)


@pytest.mark.parametrize("overrides, message", [
    ({"n": 0}, "n=0"),
    ({"temperature": -0.1}, "temperature=-0.1"),
    ({"n": "four"}, "n='four'"),
    ({"approach": "dvts", "n": 6, "beam_width": 4}, "n=6 is not a multiple of beam_width=4"),
    ({"approach": "beam_search", "n": 4, "beam_width": 8}, "beam_width=8 is larger than n=4"),
    ({"num_iterations": 0}, "num_iterations=0"),
    ({"lookahead": -1}, "lookahead=-1"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"model_path": "not a model"}, "model_path='not a model'"),
    ({"chunk": 3, "num_chunks": 3}, "chunk=3 must be below num_chunks=3"),
])
def test_bad_values_name_field_and_value(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_recipe({}, overrides)


def test_command_line_beats_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("n: 4\nseed: 1\nsystem_prompt: hello\n")
    recipe = load_recipe(f, ["n=8", "seed=7", "system_prompt=1"])
    assert (recipe.n, recipe.seed, recipe.system_prompt) == (8, 7, "1")


def test_override_syntax():
    assert parse_override("filter_duplicates=true") == ("filter_duplicates", True)
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("n8")


def test_search_key_ignores_chunk_fields():
    a = Recipe(model_path=EMBEDDED_MODEL, chunk=0, num_chunks=4)
    b = Recipe(model_path=EMBEDDED_MODEL, chunk=3, num_chunks=4)
    c = Recipe(model_path=EMBEDDED_MODEL, dataset_start=0, dataset_end=10)
    assert a.search_key == b.search_key == c.search_key
    assert Recipe(model_path=EMBEDDED_MODEL, n=8).search_key != a.search_key


def test_vllm_enforce_eager_reaches_both_engines_and_keeps_earlier_parents_unless_set():
    default = Recipe(model_path=EMBEDDED_MODEL)
    assert default.policy_settings.enforce_eager is None and default.prm_settings.enforce_eager is None
    compiled = Recipe(model_path=EMBEDDED_MODEL, backend="vllm", vllm_enforce_eager=False)
    assert compiled.policy_settings.enforce_eager is False and compiled.prm_settings.enforce_eager is False
    # a field added after stores existed: unset, the search key is the one recipes had before it
    before = {k: v for k, v in default.result_params().items() if k not in ("prm_backend", "vllm_enforce_eager")}
    assert default.search_key == hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert compiled.search_key != Recipe(model_path=EMBEDDED_MODEL, backend="vllm").search_key  # kernels round otherwise


@pytest.mark.parametrize("overrides", [{"backend": "transformers", "prm_backend": "transformers"},
                                       {"backend": "transformers", "prm_base_url": "http://127.0.0.1:8001"}])
def test_vllm_enforce_eager_where_no_vllm_engine_runs_is_named(overrides):
    with pytest.raises(RecipeError, match=r"vllm_enforce_eager=True sets how this process's vLLM engines run, but "
                                          r"backend='transformers'"):
        build_recipe({"vllm_enforce_eager": True, **overrides})
