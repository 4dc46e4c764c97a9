package mesh

import "syscall"

// syscallEMFILE is retried by Serve like a temporary accept error.
const syscallEMFILE = syscall.EMFILE
