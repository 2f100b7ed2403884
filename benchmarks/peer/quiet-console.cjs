// Preloaded into the Node original: its per-connection and per-message
// console.log lines go nowhere, as a production deployment would have them
// (console.error and console.warn still reach its log).
'use strict';
console.log = function () {};
