"""Recipe validation: every recipe in jobs/ loads; bad recipes fail with one line naming the field."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline import storage
from pipeline.config.recipe import Recipe, apply_overrides, build_recipe, load_recipe
from pipeline.errors import RecipeError

JOBS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))
DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
BASE = {"name": "t", "output_dir": "/tmp/x", "ingest": {"url_lists": ["a.parquet"]}}


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_recipe_in_jobs_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem


GPU_RECIPES = {"cc3m", "cc3m-1.3b", "laion-250m-12b", "shapes-gpu"}
"""The recipes meant for GPUs; every other one (the demo) runs on CPUs."""


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_recipe_says_where_its_models_run(path):
    """GPU use is the recipe's, stage by stage: a GPU recipe asks for GPUs in every stage that runs
    a model (an autoscaling cluster starts none until asked), a CPU recipe in none. A cluster
    recipe also sizes its encode pool: the cluster has no GPU node when encode starts."""
    recipe = load_recipe(path)
    asks = {}
    for name in ("dvae", "clip"):
        if getattr(recipe, name).weights is None:  # given weights are checked, not trained
            asks[f"{name}.train.use_gpu"] = bool(getattr(recipe, name).train.use_gpu)
    asks["transformer.train.use_gpu"] = bool(recipe.transformer.train.use_gpu)
    for name in ("encode", "sample", "evaluate"):
        section = getattr(recipe, name)
        if section is not None:
            asks[f"{name}.gpus_per_actor"] = bool(section.gpus_per_actor)
    assert GPU_RECIPES <= {p.stem for p in JOBS}
    wanted = path.stem in GPU_RECIPES
    assert asks == dict.fromkeys(asks, wanted), f"{path.name}: GPU asks {asks}"
    if wanted and (recipe.ray.address or not storage.is_local(recipe.output_dir)):
        assert recipe.encode.actors, f"{path.name}: size the encode pool (encode.actors)"


def test_demo_recipe_is_synthetic_and_small():
    recipe = load_recipe(Path("jobs/demo.yaml"))
    assert recipe.ingest.synthetic is not None
    assert recipe.ingest.synthetic.count <= 5000


def test_defaults_are_the_papers():
    r = build_recipe(BASE)
    assert (r.filter.min_aspect_ratio, r.filter.max_aspect_ratio) == (0.5, 2.0)
    assert r.filter.languages == ("en",)
    assert (r.text_tokenizer.vocab_size, r.text_tokenizer.text_len, r.text_tokenizer.bpe_dropout) == (16384, 256, 0.1)
    assert r.text_tokenizer.lowercase


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"filter": {"shard_sise": 3}}, "field 'filter.shard_sise': unknown key"),
        ({"filter": {"shard_size": "many"}}, "field 'filter.shard_size': Input should be a valid integer"),
        ({"filter": {"shard_size": 0}}, "field 'filter.shard_size': Input should be greater than or equal to 1"),
        ({"filter": {"min_aspect_ratio": 3.0}}, "field 'filter': min_aspect_ratio is above max_aspect_ratio"),
        ({"filter": {"boilerplate_patterns": ["(unclosed"]}}, "is not a regex"),
        ({"ingest": {"url_lists": []}}, "field 'ingest': give either url_lists or synthetic"),
        ({"ingest": {"url_lists": ["a.csv"], "synthetic": {}}}, "give url_lists or synthetic, not both"),
        ({"ingest": {"url_lists": ["a.csv"], "resize_mode": "stretch"}}, "field 'ingest.resize_mode'"),
        ({"name": ""}, "field 'name'"),
    ],
)
def test_bad_values_name_the_field(patch, expected):
    data = {**BASE, **patch}
    with pytest.raises(RecipeError) as info:
        build_recipe(data, "r.yaml")
    message = str(info.value)
    assert expected in message
    assert message.startswith("r.yaml: ")
    assert "\n" not in message


def test_missing_section_is_named():
    with pytest.raises(RecipeError, match="field 'ingest': Field required"):
        build_recipe({"name": "t", "output_dir": "/x"}, "r.yaml")


def test_overrides_apply_typed_values():
    data = apply_overrides(BASE, ["filter.shard_size=500", "filter.languages=[en, de]", "ray.address=null"])
    r = build_recipe(data)
    assert r.filter.shard_size == 500
    assert r.filter.languages == ("en", "de")
    assert r.ray.address is None
    assert "filter" not in BASE  # the original is not modified


def test_bad_override_is_refused():
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides(BASE, ["filter.shard_size"])
    with pytest.raises(RecipeError, match="'name' is not a section"):
        apply_overrides(BASE, ["name.x=1"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ningest: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line \d"):
        load_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe must be a mapping"):
        load_recipe(path)


def test_configs_are_frozen():
    r = build_recipe(BASE)
    with pytest.raises(ValidationError, match="frozen"):
        r.filter.shard_size = 3  # type: ignore[misc]


def test_transformer_defaults_and_cluster_recipes_are_the_papers():
    t = build_recipe(BASE).transformer
    assert (t.preset, t.text_loss_weight, t.image_loss_weight) == ("12b", 0.125, 0.875)
    assert (t.train.lr, t.train.warmup_steps, t.train.betas, t.train.eps) == (4.5e-4, 5000, (0.9, 0.96), 1e-8)
    assert (t.train.weight_decay, t.train.grad_clip) == (4.5e-2, 4.0) and t.train.ema_decay is not None
    big = load_recipe(Path("jobs/laion-250m-12b.yaml"))
    train = big.transformer.train
    assert big.transformer.preset == "12b" and train.zero_stage == 3 and train.precision == "bf16"
    assert train.workers * train.batch_size * train.grad_accum == 1024  # the paper's batch
    assert (big.dvae.grid, big.dvae.vocab_size, big.text_tokenizer.text_len) == (32, 8192, 256)
    mid = load_recipe(Path("jobs/cc3m-1.3b.yaml"))
    assert mid.transformer.preset == "1.3b" and mid.transformer.train.use_gpu


def test_a_trainer_given_in_part_keeps_its_sections_defaults():
    """`transformer: {train: {workers: 64}}` changes the workers of the transformer's own trainer (the
    paper's lr, ZeRO stage, clipping, EMA), not a generic trainer; the same through an override."""
    paper = build_recipe(BASE).transformer.train
    for recipe in (
        build_recipe({**BASE, "transformer": {"train": {"workers": 64, "use_gpu": True}}}),
        build_recipe(apply_overrides(BASE, ["transformer.train.workers=64", "transformer.train.use_gpu=true"])),
    ):
        train = recipe.transformer.train
        assert (train.workers, train.use_gpu) == (64, True)
        assert train.model_dump(exclude={"workers", "use_gpu"}) == paper.model_dump(exclude={"workers", "use_gpu"})
    dvae = build_recipe({**BASE, "dvae": {"train": {"steps": 10}}}).dvae.train
    assert (dvae.steps, dvae.lr, dvae.min_lr) == (10, 1e-4, 1.25e-6)


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"transformer": {"train": {"offload_params": True}}}, "offload_params needs zero_stage 3"),
        ({"transformer": {"train": {"zero_stage": 0, "offload_optimizer": True}}}, "offload_optimizer needs"),
        ({"transformer": {"conv_kernel": 10}}, "conv_kernel 10 must be odd"),
        ({"transformer": {"preset": "40b"}}, "field 'transformer.preset'"),
    ],
)
def test_bad_transformer_settings_name_the_field(patch, expected):
    with pytest.raises(RecipeError, match=expected):
        build_recipe({**BASE, **patch})


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"sample": {"prompts": []}}, "field 'sample': no prompts and no completions: give at least one"),
        ({"sample": {"prompts": ["a", " "]}}, "field 'sample': a prompt is empty"),
        ({"sample": {"completions": [{"prompt": "a", "image": "x.png"}]}}, "field 'sample.completions.0.rows'"),
        ({"sample": {"completions": [{"prompt": "a", "image": "x.png", "rows": -1}]}}, "sample.completions.0.rows"),
        ({"sample": {"prompts": ["a"], "top": 9, "candidates": 8}}, "field 'sample': top 9 is above candidates 8"),
        ({"sample": {"prompts": ["a"], "top_p": 1.5}}, "field 'sample.top_p'"),
        ({"evaluate": {}}, "recipe: evaluate needs ingest.synthetic: the analyzer reads only the synthetic shapes"),
    ],
)
def test_generation_sections_are_checked(patch, expected):
    with pytest.raises(RecipeError) as info:
        build_recipe({**BASE, **patch}, "r.yaml")
    assert expected in str(info.value)


def test_generation_stages_are_optional():
    from pipeline.errors import InputError
    from pipeline.workflow import build_stages, prepare

    recipe = build_recipe(BASE)
    assert [s.name for s in build_stages(recipe)][-1] == "train"
    with pytest.raises(InputError, match="stage 'sample' is not in this recipe"):
        prepare(recipe, until="sample")
    demo = load_recipe(Path("jobs/demo.yaml"))
    assert [s.name for s in build_stages(demo)][-2:] == ["sample", "evaluate"]
    bad = {**BASE, "evaluate": {"seen_one": 0, "heldout_one": 0, "seen_two": 0, "heldout_two": 0, "paraphrased": 0}}
    bad["ingest"] = {"synthetic": {}}
    with pytest.raises(RecipeError, match="the prompt set is empty"):
        build_recipe(bad, "r.yaml")


def _digests(overrides: list[str]) -> dict[str, str]:
    from pipeline.workflow import build_stages, fingerprints

    return {name: fp.digest for name, fp in fingerprints(build_stages(load_recipe(DEMO, overrides))).items()}


def test_pool_sizes_retries_and_tracking_are_not_part_of_any_fingerprint():
    """A resubmission on a resized cluster (more actors, more retries, another W&B project) resumes;
    a field that changes what a stage writes changes its fingerprint and its downstream stages'."""
    plain = _digests([])
    execution = [
        "encode.actors=7",
        "encode.max_task_retries=9",
        "sample.actors=3",
        "evaluate.wandb_project=elsewhere",
        "dvae.train.max_failures=10",
        "clip.train.keep_checkpoints=5",
        "transformer.train.log_every=1",
        "transformer.train.wandb_project=elsewhere",
    ]
    for override in execution:
        assert _digests([override]) == plain, override
    changed = _digests(["encode.batch_size=3"])
    assert [name for name in plain if changed[name] != plain[name]] == ["encode", "train", "sample", "evaluate"]
    assert _digests(["transformer.train.lr=1e-3"])["train"] != plain["train"]


def _sections(cls: type) -> list[type]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _sections(sub))]


def test_added_fields_name_fingerprinted_fields_in_the_form_their_files_hold():
    """`added_fields` values are compared with `_fingerprint.json` contents: JSON, as the field dumps."""
    from pydantic import TypeAdapter

    from pipeline.config.base import Config

    declared = 0
    for cls in _sections(Config):
        for name, value in vars(cls).get("added_fields", {}).items():
            adapter = TypeAdapter(cls.model_fields[name].annotation)
            assert adapter.dump_python(adapter.validate_python(value), mode="json") == value, f"{cls.__name__}.{name}"
            declared += 1
    assert declared >= 6
    assert load_recipe(DEMO).transformer.added_paths() == {"train.null_caption_prob": 0.0}
    with pytest.raises(TypeError, match=r"names no fingerprinted field: \['nope'\]"):
        type("Bad", (Config,), {"__annotations__": {"x": "int"}, "x": 0, "added_fields": {"nope": 1}})
    with pytest.raises(TypeError, match=r"names no fingerprinted field: \['x'\]"):
        fields = {"__annotations__": {"x": "int"}, "x": 0, "added_fields": {"x": 0}, "execution_only": {"x"}}
        type("Bad", (Config,), fields)
