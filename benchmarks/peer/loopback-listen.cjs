// Preloaded into the Node original (node --require): its server.listen(PORT)
// would bind every interface; this binds it to 127.0.0.1 only, so that the
// benchmarked server is never reachable from outside this machine.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if ((typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) && typeof args[1] !== 'string') {
    args.splice(1, 0, '127.0.0.1');
  } else if (first && typeof first === 'object' && first.port !== undefined && first.host === undefined) {
    args[0] = { ...first, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
