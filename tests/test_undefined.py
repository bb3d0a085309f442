"""The last check of a conversion: the port reads no name that nothing defines (porter/undefined.py)."""

from __future__ import annotations

import pytest

from porter.errors import PorterError
from porter.undefined import check_defined

SOURCE = (
    "class Block:\n"
    "    def forward(self, hidden_states):\n"
    "        batch_size, seq, dim = hidden_states.shape\n"
    "        hidden_states = hidden_states.view(-1, dim)\n"
    "        return hidden_states.new_zeros(batch_size * seq, dim)\n"
)
PORT = (
    "class Block:\n"
    "    def forward(self, hidden_states):\n"
    "        dim = hidden_states.shape[-1]\n"
    "        hidden_states = hidden_states.view(-1, dim)\n"
    "        return hidden_states.new_zeros(batch_size * seq, dim)\n"
)


def test_a_name_whose_definition_went_is_refused_at_the_line_hf_reads_it():
    with pytest.raises(PorterError) as err:
        check_defined(PORT, SOURCE, "modeling_x.py")
    text = str(err.value)
    assert text.startswith("modeling_x.py:5: the port would read `batch_size`"), text
    assert text.endswith("in Block.forward"), text


def test_a_port_that_defines_what_it_reads_passes():
    check_defined(SOURCE, SOURCE, "modeling_x.py")
