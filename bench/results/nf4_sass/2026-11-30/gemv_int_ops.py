"""Compile the FMA forward GEMV (1 and 2 tokens) for sm_90 with variants of the nibble extraction and count
the loop's SASS instructions a packed byte (integer ops, LDS, FP). No GPU needed; run from anywhere with the
repository at /work/main:  python gemv_int_ops.py [variant ...]"""
import importlib.util, os, re, sys, collections, subprocess, tempfile
sys.path.insert(0, "/work/main")
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
SRC = open("/work/main/lowmem_compile/codegen/nf4_matmul.py").read()
CUR = '''    byte = tl.load(packed_ptr + start[:, None] + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    index = tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))  # high nibble first'''
assert CUR in SRC
VARIANTS = {
 "cur": CUR,
 "u8ops": CUR.replace(").to(tl.int32)\n", ")\n").replace("tl.join(byte >> 4, byte & 0xF)", "tl.join((byte >> 4).to(tl.int32), (byte & 0xF).to(tl.int32))"),
 "u32": CUR.replace(").to(tl.int32)\n", ").to(tl.uint32)\n").replace("tl.join(byte >> 4, byte & 0xF)", "tl.join(byte >> 4, byte & 0xF).to(tl.int32)"),
 "u8join": CUR.replace(").to(tl.int32)\n", ")\n").replace("tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))", "tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,)).to(tl.int32)"),
 "words": """    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + start[:, None] // 4 + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0)
    byte = tl.reshape((words[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]) & 0xFF, (C, 16))
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    index = tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))  # high nibble first""",
 "wjoin": """    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + start[:, None] // 4 + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0)
    b0, b1, b2, b3 = words & 0xFF, (words >> 8) & 0xFF, (words >> 16) & 0xFF, (words >> 24) & 0xFF
    byte = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (C, 16))
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    index = tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))  # high nibble first""",
 "i16": CUR.replace(").to(tl.int32)\n", ").to(tl.int16)\n").replace("tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))", "tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,)).to(tl.int32)"),
}
def load(name, body):
    path = f"/tmp/nf4_{name}.py"
    open(path, "w").write(SRC.replace(CUR, body).replace("from ..formats import nf4 as nf4_format", "from lowmem_compile.formats import nf4 as nf4_format"))
    spec = importlib.util.spec_from_file_location(f"nf4_{name}", path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
def compile_fwd(nm, bm=1, rows=4, tpr=128, warps=4, stages=2):
    sig = {"x_ptr": "*bf16", "xw_ptr": "*i32", "packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8",
           "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
           "M": "i32", "N": "i32", "KH": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_ys": "i32", "KH_PER_SPLIT": "i32"}
    const = dict(BLOCKSIZE=64, NESTED=True, HAS_BIAS=False, X_KIND=0, PRECISION="tf32", FMA=True, BLOCK_M=bm, ROWS=rows, TPR=tpr)
    for k in const: sig[k] = "constexpr"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in ("KH", "stride_xm", "KH_PER_SPLIT")}
    return triton.compile(ASTSource(nm._gemv_fwd_kernel, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
def loop_ops(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f: f.write(k.asm["cubin"])
    sass = subprocess.run([f"{BIN}/nvdisasm", "-c", "-g", f.name], capture_output=True, text=True).stdout
    instrs, labels = [], {}
    for l in sass.splitlines():
        lm = re.match(r"\s*\.(L_x_\d+):", l)
        if lm: labels[lm.group(1)] = len(instrs)
        if re.search(r"/\*[0-9a-f]{4}\*/", l): instrs.append(l)
    best = None
    for j, l in enumerate(instrs):
        b = re.search(r"BRA.*`?\(?\.(L_x_\d+)", l)
        if b and b.group(1) in labels and labels[b.group(1)] <= j:
            n = j - labels[b.group(1)] + 1
            if best is None or n > best[0]: best = (n, labels[b.group(1)], j)
    body = instrs[best[1]:best[2] + 1]
    return collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", l).group(1) for l in body)
INT = ("LOP3", "SHF", "PRMT", "LEA", "IADD3", "SEL", "ISETP", "VIADD", "IMNMX", "VIMNMX")
for name in sys.argv[1:] or VARIANTS:
    try:
        for bm, rows in ((1, 4), (2, 4)):
            ops = loop_ops(compile_fwd(load(name, VARIANTS[name]), bm, rows))
            nbytes = rows * 16
            ints = sum(v for k, v in ops.items() if k in INT)
            print(f"{name} bm={bm}: total {sum(ops.values())/nbytes:.1f}/B int {ints/nbytes:.2f}/B LDS {ops['LDS']/nbytes:.1f} "
                  f"FP {(ops['FFMA']+ops['FMUL']+ops['FADD'])/nbytes:.2f} IMAD {ops['IMAD']/nbytes:.2f} STS {ops['STS']} BAR {ops['BAR']} | "
                  + " ".join(f"{k}{ops[k]}" for k in INT if ops[k]), flush=True)
    except Exception as e:
        print(name, "failed", type(e).__name__, str(e)[:200])
