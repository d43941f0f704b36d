module.exports = { testMatch: ["**/test/*.test.cjs"], cacheDirectory: "node_modules/.cache/jest" };
