"""Model and TrainableModel refuse what they would otherwise ignore or be unable to serve, naming the fix."""

from __future__ import annotations

import pydantic
import pytest

import art_core as art
from art_core.model_checks import validate_model_name


def test_an_unknown_field_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'typo_option'") as error:
        art.TrainableModel(name="a", project="b", base_model="x", typo_option=3)
    assert "base_model" in str(error.value)  # the valid fields are listed


@pytest.mark.parametrize(
    ("kwargs", "closest"),
    [
        ({"name": "a", "project": "b", "base_modle": "x"}, "base_model"),
        ({"name": "a", "project": "b", "base_model": "x", "base_pth": ".art"}, "base_path"),
        ({"name": "a", "projet": "b", "base_model": "x"}, "project"),
        ({"name": "a", "project": "b", "base_model": "x", "report_metric": []}, "report_metrics"),
    ],
)
def test_a_typo_names_the_closest_field(kwargs: dict[str, object], closest: str) -> None:
    with pytest.raises(TypeError, match=rf"did you mean '{closest}'\?"):
        art.TrainableModel(**kwargs)  # type: ignore[arg-type]


def test_plain_model_refuses_unknown_fields_too() -> None:
    with pytest.raises(TypeError, match=r"'base_model'.*its fields are"):
        art.Model(name="a", project="b", base_model="x")


def test_a_subclass_may_add_fields_and_still_refuses_typos() -> None:
    class Agent(art.TrainableModel):
        temperature: float = 1.0

    assert Agent(name="a", project="b", base_model="x", temperature=0.5).temperature == 0.5
    with pytest.raises(TypeError, match=r"did you mean 'temperature'"):
        Agent(name="a", project="b", base_model="x", temprature=0.5)  # type: ignore[call-arg]


def test_arts_internal_config_is_refused_key_by_key_with_the_replacement() -> None:
    config = {
        "peft_args": {"r": 16},
        "init_args": {"max_seq_length": 4096, "gpu_memory_utilization": 0.7},
        "trainer_args": {"learning_rate": 1e-5},
        "engine_args": {"enforce_eager": True},
        "not_an_art_key": 1,
    }
    with pytest.raises(TypeError) as error:
        art.TrainableModel(name="a", project="b", base_model="x", _internal_config=config)
    message = str(error.value)
    assert "peft_args: " in message and "lora_rank" in message
    assert "init_args: " in message and "max_sequence_length" in message
    assert "trainer_args: " in message and "backend.train(model, groups, learning_rate=...)" in message
    assert "engine_args: " in message and "engine=" in message
    assert "not_an_art_key: not a key of ART's InternalModelConfig" in message


@pytest.mark.parametrize("empty", [None, {}])
def test_an_empty_internal_config_loses_nothing_and_is_accepted(empty: object) -> None:
    model = art.TrainableModel(name="a", project="b", base_model="x", _internal_config=empty)
    assert model.name == "a"


@pytest.mark.parametrize(("name", "char"), [("agent@3", "@"), ("agent@latest", "@"), ("agent:step3", ":")])
def test_a_name_that_cannot_be_served_is_refused_at_construction(name: str, char: str) -> None:
    with pytest.raises(pydantic.ValidationError) as error:
        art.TrainableModel(name=name, project="b", base_model="x")
    message = str(error.value)
    assert f"contains {char!r}" in message and "e.g. 'agent-" in message
    with pytest.raises(ValueError, match="inference names use to pick a step"):
        validate_model_name(name)


def test_a_servable_name_gets_its_step_names() -> None:
    model = art.Model(name="agent-3.v2_x", project="b")
    assert model.get_inference_name() == "agent-3.v2_x"
    assert model.get_inference_name(5) == "agent-3.v2_x@5"
