// The folder, outside the repository, where the platform checks keep what is slow to make and does not
// change between runs: the arm64 Node binary (scripts/qemu-arm64.js) and the Debian 11 root
// (scripts/debian-root.js). FUSED_MOE_CACHE overrides it; deleting it only costs time.
'use strict';

const os = require('os');
const path = require('path');

function cacheDir() {
  if (process.env.FUSED_MOE_CACHE) return path.resolve(process.env.FUSED_MOE_CACHE);
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'fused-moe');
}

module.exports = { cacheDir };
