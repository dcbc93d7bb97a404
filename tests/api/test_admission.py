from __future__ import annotations

import pytest

from api.admission import Admission
from tapsign_sdk.problems import Overloaded


def test_new_transactions_are_refused_only_while_saturated() -> None:
    admission = Admission(limit=2)
    with admission.serving(starts=True), admission.serving(starts=False):
        assert admission.active == 2
        with pytest.raises(Overloaded) as refused, admission.serving(starts=True):
            pytest.fail("admitted beyond the limit")
        assert refused.value.status == 503
        assert refused.value.retry_after == 1.0
        with admission.serving(starts=False):  # finishing work is always served
            assert admission.active == 3
    assert (admission.active, admission.shed) == (0, 1)
    with admission.serving(starts=True):
        assert admission.active == 1


def test_a_long_poll_that_only_waits_is_not_active() -> None:
    admission = Admission(limit=1)
    with admission.serving(starts=False):
        with admission.waiting():
            assert admission.active == 0
            with admission.serving(starts=True):
                pass
        assert admission.active == 1
    assert admission.active == 0


def test_an_error_in_the_route_releases_its_place() -> None:
    admission = Admission(limit=1)
    with pytest.raises(ValueError, match="the route failed"), admission.serving(starts=True):
        raise ValueError("the route failed")
    assert admission.active == 0
