// Loads `greet` through NODE_PATH from the mounted image; nothing here knows about jkmount.
const greet = require('greet');
console.log(greet('world'));
