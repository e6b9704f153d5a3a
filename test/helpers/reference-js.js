// test/helpers/reference.ts for plain-node child processes.
'use strict';
module.exports = require('./load-ts').loadTs('reference.ts');
