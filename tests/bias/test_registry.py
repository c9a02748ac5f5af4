import importlib
import re

import pytest

from dpbias_utils import paths
from dpbias_utils.bias import registry

from test_evaluate import EXPECTED  # same folder (tests/bias is on sys.path under pytest)


def test_every_evaluated_metric_is_registered_with_its_groups():
    for name, groups in EXPECTED.items():
        spec = registry.spec(name)
        assert groups <= set(spec.groups) | {"planted"}, (name, groups, spec.groups)
    with pytest.raises(KeyError, match="registered: learned_association, loglik_gap"):
        registry.spec("regard")


def test_outcome_metrics_have_centres_inside_their_bounds():
    for s in registry.outcome_metrics():
        lo, hi = s.bounds
        assert lo <= s.centre <= hi and s.outcome_group in s.groups
    assert registry.spec("local_hellinger").clip(-0.2) == 0.0


def test_every_family_module_names_its_reference():
    for family in registry.families():
        doc = importlib.import_module(f"dpbias_utils.bias.{family}").__doc__
        assert re.search(r"Reference", doc), family


def test_metrics_page_table_is_the_registry():
    readme = (paths.DOCS / "metrics.md").read_text(encoding="utf-8")
    block = readme.split("<!-- metrics:start -->\n", 1)[1].split("\n<!-- metrics:end -->", 1)[0]
    assert block == registry.markdown_table()
