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


HF_MODEL = (
    "class Base(PreTrainedModel):\n"
    "    def get_masks(self, ids):\n"
    "        return ids\n\n\n"
    "class Model(Base):\n"
    "    def forward(self, ids):\n"
    "        mask = self.get_masks(ids)\n"
    "        return self.encoder(ids, mask)\n"
)
PORT_MODEL = (
    "class Model(nn.Module):\n"
    "    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.encoder = Encoder(config)\n\n"
    "    def forward(self, ids):\n"
    "        mask = self.get_masks(ids)\n"
    "        return self.encoder(ids, mask)\n"
)


def test_a_method_of_a_base_the_port_does_not_keep_is_refused():
    with pytest.raises(PorterError) as err:
        check_defined(PORT_MODEL, HF_MODEL, "modeling_x.py")
    text = str(err.value)
    assert text.startswith("modeling_x.py:8: the port would call `self.get_masks(...)`"), text
    assert text.endswith("in Model.forward"), text


def test_methods_of_the_class_its_port_bases_and_nn_module_pass():
    port = PORT_MODEL.replace("self.get_masks(ids)", "self.helper(ids) + self.parent_helper(ids)").replace(
        "class Model(nn.Module):", "class Parent(nn.Module):\n    def parent_helper(self, x):\n        return x\n\n\n"
        "class Model(Parent):") + "\n    def helper(self, ids):\n        return ids\n"
    port = "from torch import nn\n\nEncoder = nn.Identity\n\n\n" + port
    check_defined(port, port, "modeling_x.py")
