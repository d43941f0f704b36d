const { version } = require('./version');

module.exports = (name) => `Hello, ${name}! (greet ${version}, loaded from an OCI image mounted by jkmount)`;
