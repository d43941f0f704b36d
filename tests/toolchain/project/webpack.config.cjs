const path = require("path");
module.exports = {
  mode: "production",
  entry: "./src/index.js",
  output: { path: path.resolve(__dirname, "dist-webpack"), filename: "main.js" },
  cache: { type: "filesystem" },
};
