"""`ldmflow lineage` of any registered name: MLflow's filter parser has no escapes, so a name with both quote
kinds or a backslash is searched with LIKE and narrowed to equal names (a look-alike name never leaks in)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings, strategies as st
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fakes import tracked_folder
from ldmflow.tags import SAMPLE_MODEL_NAME_TAG, SAMPLE_MODEL_VERSION_TAG, STAGE_TAG, STAGE_VERSION_TAG
from ldmflow.models.kinds import LEGACY_DDPM
from ldmflow.tracking.lineage import SAMPLE_STAGE, lineage

NAMES = st.text(st.sampled_from("ab '\"\\%_"), min_size=1, max_size=8).filter(lambda name: name.strip() == name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with tracked_folder(tmp_path_factory.mktemp("names")):
        yield MlflowClient()


@settings(max_examples=15, deadline=None)
@given(name=NAMES)
@example(name="it's \"x\"")
@example(name="a\\")
def test_lineage_finds_a_version_and_its_samples_whatever_quotes_its_name_holds(store, name):
    look_alike = "".join("z" if c in "'\"\\%_" else c for c in name) + "-other"
    for model in (name, look_alike):
        try:
            store.create_registered_model(model)
        except MlflowException:  # registered by an earlier example
            continue
        version = store.create_model_version(model, "file:///nothing")
        store.set_model_version_tag(model, version.version, STAGE_VERSION_TAG, LEGACY_DDPM.name)
        experiment = store.get_experiment_by_name("Default").experiment_id
        run = store.create_run(experiment, tags={SAMPLE_MODEL_NAME_TAG: model, SAMPLE_MODEL_VERSION_TAG: "1",
                                                 STAGE_TAG: SAMPLE_STAGE})
        store.set_terminated(run.info.run_id)
    result = lineage(f"models:/{name}/1")
    assert result["ddpm"]["name"] == name
    assert [store.get_run(r).data.tags[SAMPLE_MODEL_NAME_TAG] for r in result["samples"]] == [name]
