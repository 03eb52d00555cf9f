"""The kernel source MLX 0.32 generates for `mx.fast.metal_kernel`, rebuilt rule for rule.

Mirrors `write_signature`, `write_template`, `make_template_hash` and the kernel naming in
mlx/backend/common/metal_kernel.cpp (MLX 0.32.x), including its quirks: substring detection of
`_shape/_strides/_ndim` and attribute names anywhere in the body text (comments too, header not searched),
`constant` pointers for inputs under 8 elements, and the invalid parameter list MLX emits for two or more
outputs with shape parameters and no attribute. test_source.py checks this against MLX's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

MAX_CONSTANT_ARRAY_SIZE = 8

TYPE_STRINGS = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float64: "double",
    mx.complex64: "complex64_t", mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t",
    mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t",
    mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}

# (attribute, type) in MLX's order; a parameter is added when its name occurs in the body.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]


def type_string(dtype: mx.Dtype) -> str:
    """MLX's `get_type_string`."""
    try:
        return TYPE_STRINGS[dtype]
    except KeyError:
        raise ValueError(f"Unsupported compilation type {dtype}") from None


@dataclass(frozen=True, slots=True)
class InputMeta:
    """What the generated source depends on for one input array."""

    dtype: mx.Dtype
    ndim: int
    size: int


@dataclass(frozen=True, slots=True)
class Param:
    """One kernel parameter: its declared type text, name and role (input/shape/strides/ndim/output/attr)."""

    ctype: str
    name: str
    role: str
    index: int = -1  # input or output index for buffer roles


@dataclass(frozen=True, slots=True)
class GeneratedKernel:
    name: str            # host name, e.g. custom_kernel_foo_float_3
    source: str          # exactly what MLX compiles (after its utils.h)
    template_def: str    # "<float, 3>" or ""
    params: tuple[Param, ...]


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def _template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # std::ostream prints bools as 1/0
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def write_template(template) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def make_template_hash(template_def: str) -> str:
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def check_template(template) -> None:
    for _, value in template:
        if not isinstance(value, (bool, int, mx.Dtype)):
            raise ValueError("[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`.")


def generate(name: str, input_names, output_names, source: str, header: str, atomic_outputs: bool,
             inputs: list[InputMeta], output_dtypes, template) -> GeneratedKernel:
    """Builds the kernel name, source and parameter list exactly as MLX 0.32 does."""
    template = list(template or [])
    check_template(template)
    infos = shape_infos(source, input_names)
    attrs = attributes(source)

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if template:
        template_def = write_template(template)
        kernel_name += "_" + make_template_hash(template_def)
    for meta in inputs:
        kernel_name += "_" + type_string(meta.dtype)
        if meta.ndim == 0:
            kernel_name += "s"
        elif meta.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + type_string(dtype)

    params: list[Param] = []
    src = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename" for _, v in template]
        src += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    src += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for i, (iname, meta) in enumerate(zip(input_names, inputs)):
        location = "constant" if meta.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if meta.ndim == 0 else "*"
        ctype = f"const {location} {type_string(meta.dtype)}{ref}"
        src += f"  {ctype} {iname} [[buffer({index})]],\n"
        params.append(Param(ctype, iname, "input", i))
        index += 1
        if meta.ndim > 0:
            for has, suffix, ctype in zip(infos[i], ("_shape", "_strides", "_ndim"),
                                          ("const constant int*", "const constant int64_t*", "const constant int&")):
                if has:
                    src += f"  {ctype} {iname}{suffix} [[buffer({index})]],\n"
                    params.append(Param(ctype, iname + suffix, suffix[1:], i))
                    index += 1
    for i, (oname, dtype) in enumerate(zip(output_names, output_dtypes)):
        tstr = type_string(dtype)
        ctype = f"device atomic<{tstr}>*" if atomic_outputs else f"device {tstr}*"
        src += f"  {ctype} {oname} [[buffer({index})]]"
        params.append(Param(ctype, oname, "output", i))
        # MLX compares the buffer index (which counts shape buffers) with inputs + outputs - 1.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            src += ",\n"
        else:
            src += ") {\n"
        index += 1
    for k, (attr, atype) in enumerate(attrs):
        src += f"  {atype} {attr} [[{attr}]]"
        params.append(Param(atype, attr, "attr"))
        src += ",\n" if k < len(attrs) - 1 else ") {\n"
    src += source + "\n}\n"
    if template:
        full = kernel_name + template_def
        src += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({full}) {full};\n'
    return GeneratedKernel(kernel_name, src, template_def, tuple(params))


def verbose_text(name: str, kernel_source: str) -> str:
    """What `verbose=True` prints (std::cout in MLX)."""
    return f"Generated source code for `{name}`:\n```\n{kernel_source}\n```\n"
