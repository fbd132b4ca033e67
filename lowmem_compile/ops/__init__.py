"""`lowmem::` custom ops: schema, fake impl, autograd, reference and CUDA implementations.

Importing this package registers every op (each module registers its own once).
"""

from . import attention  # noqa: F401
from . import host_embedding  # noqa: F401
from . import linear_cross_entropy  # noqa: F401
from . import nf4  # noqa: F401
from . import offload  # noqa: F401
